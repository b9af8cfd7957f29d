"""Secure aggregation's arithmetic (SecAgg+, Bell et al. 2020): what a site masks and what the coordinator
can unmask — only the sum of the updates of the sites that sent one, never one site's update.

One round, four exchanges (client/secure_aggregation.py at a site, server/secure_aggregation.py at the
coordinator):

1. keys: each site makes two fresh EC key pairs, one to encrypt the secret shares it sends to other
   sites (``share``) and one to agree pairwise masks (``mask``), and sends the public halves;
2. shares: each site draws a fresh seed ``b`` for its own mask and splits ``b`` and its mask private key
   into Shamir shares, one per site of the group, each encrypted for its holder (the coordinator forwards
   them and cannot read them);
3. train: each site trains, quantises its weighted update and adds its own mask and, for every other site,
   the mask agreed with it (added by one of the pair, subtracted by the other): masks cancel in the sum;
4. unmask: every site that answers sends its shares of ``b`` for the sites whose masked update arrived and
   of the mask key for the sites whose update did not; with ``threshold`` shares the coordinator removes
   what did not cancel. A site never reveals both secrets of the same site (a late site stays hidden).

The cryptography is ``cryptography``'s and pycryptodome's, composed as flwr 1.41's SecAgg+ helpers compose
them (the same keys, ciphertexts and share layout): key agreement (ECDH + HKDF-SHA256), authenticated
encryption (Fernet), Shamir shares (pycryptodome's, 16 bytes at a time), stochastic quantisation. Flower's
copies of these helpers (``flwr.common.secure_aggregation``) are internals, not its API, so this module takes
nothing from Flower (the app bundle's Flower internals are all in server/flower_seam.py).
Masks come from AES-256 in counter mode keyed by the 32-byte seed, not from Flower's ``pseudo_rand_gen``,
which folds its seed into 32 bits for numpy's Mersenne twister (a mask space one could search). Arithmetic
is modulo 2**32 in ``uint32`` arrays, so a masked update has exactly the bytes of the float32 update it hides.
"""

from __future__ import annotations

import base64
import os
import struct
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Util.Padding import pad, unpad
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASKED_DTYPE = np.uint32            # arithmetic modulo 2**32: numpy's unsigned overflow is the modulus
CLIP_RANGE = 8.0                    # each weighted update coordinate is clipped to ±CLIP_RANGE at the site
QUANT_RANGE = 2 ** 22               # ... and mapped to the integers 0..QUANT_RANGE (Flower's SecAgg+ defaults)
MAX_SITES = (2 ** 32 - 1) // QUANT_RANGE  # more summands than this could wrap the modulus (1023)
SEED_BYTES = 32
CURVE = ec.SECP384R1()


class SecureAggregationError(ValueError):
    """A message of the protocol does not fit it (wrong group, a share that does not decrypt, a bad sum)."""


def threshold_for(group_size: int) -> int:
    """Shares needed to rebuild a secret: a majority of the group (at least 2). A coordinator colluding with
    fewer sites learns nothing of any site's update; up to ``group_size - threshold`` sites may drop."""
    return max(2, group_size // 2 + 1)


# --- keys -----------------------------------------------------------------------------------------------

def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private(raw: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(raw, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecureAggregationError("a mask key share does not rebuild an EC private key")
    return key


def load_public(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, bytes(raw))
    except ValueError:
        raise SecureAggregationError("a public key of the group is not a point of the protocol's curve") from None


def agreed_key(private: ec.EllipticCurvePrivateKey, public: bytes) -> bytes:
    """The 32-byte key two sites agree on (ECDH, then HKDF-SHA256 without salt or info, as Flower's SecAgg+
    derives it), urlsafe-base64 as Fernet wants it."""
    secret = private.exchange(ec.ECDH(), load_public(public))
    return base64.urlsafe_b64encode(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=None).derive(secret))


def encrypt(key: bytes, plaintext: bytes) -> bytes:
    return Fernet(key).encrypt(plaintext)


def decrypt(key: bytes, ciphertext: bytes) -> bytes:
    return Fernet(key).decrypt(ciphertext)


# --- shares ---------------------------------------------------------------------------------------------

def create_shares(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it: the secret is padded to
    16-byte blocks (PKCS#7) and each block shared by pycryptodome over GF(2^128); share ``i`` is ``i`` (4 bytes,
    little-endian) then its share of every block (Flower's SecAgg+ layout)."""
    padded = pad(secret, 16)
    shares = [bytearray(i.to_bytes(4, "little")) for i in range(1, count + 1)]
    for start in range(0, len(padded), 16):
        for index, piece in Shamir.split(threshold, count, padded[start:start + 16], ssss=False):
            shares[index - 1] += piece
    return [bytes(share) for share in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret of ``create_shares`` from enough of its shares (ValueError if they do not rebuild one)."""
    blocks = (len(shares[0]) - 4) >> 4
    indexed = [(int.from_bytes(share[:4], "little"), share) for share in shares]
    padded = b"".join(Shamir.combine([(i, share[4 + 16 * b:20 + 16 * b]) for i, share in indexed], ssss=False)
                      for b in range(blocks))
    try:
        return unpad(padded, 16)
    except ValueError:
        raise ValueError("Failed to combine shares") from None


def _pack(src: int, dst: int, b_share: bytes, key_share: bytes) -> bytes:
    return struct.pack("<QQI", src, dst, len(b_share)) + b_share + key_share


def _unpack(plain: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst, size = struct.unpack("<QQI", plain[:20])
    return src, dst, plain[20:20 + size], plain[20 + size:]


def make_shares(me: int, group: list[int], share_keys: dict[int, bytes], share_private: ec.EllipticCurvePrivateKey,
                seed: bytes, mask_private: ec.EllipticCurvePrivateKey) -> tuple[dict[int, bytes], tuple[bytes, bytes]]:
    """Shamir shares of ``seed`` and of the mask private key, one per site of ``group``: the others' encrypted
    for them (node → ciphertext, which names source and destination inside), and this site's own pair."""
    t = threshold_for(len(group))
    b_shares = create_shares(seed, t, len(group))
    key_shares = create_shares(private_bytes(mask_private), t, len(group))
    out, own = {}, (b"", b"")
    for node, b_share, key_share in zip(group, b_shares, key_shares):
        if node == me:
            own = (b_share, key_share)
        else:
            out[node] = encrypt(agreed_key(share_private, share_keys[node]), _pack(me, node, b_share, key_share))
    return out, own


def open_share(me: int, src: int, ciphertext: bytes, share_private: ec.EllipticCurvePrivateKey,
               src_share_key: bytes) -> tuple[bytes, bytes]:
    """Decrypt the shares ``src`` sent this site; the ciphertext must name the same source and destination
    (a coordinator that swaps ciphertexts between sites is caught here)."""
    try:
        plain = decrypt(agreed_key(share_private, src_share_key), bytes(ciphertext))
    except Exception:  # noqa: BLE001 - Fernet's InvalidToken and malformed tokens alike
        raise SecureAggregationError(f"the shares from node {src} do not decrypt with its key") from None
    source, destination, b_share, key_share = _unpack(plain)
    if (source, destination) != (src, me):
        raise SecureAggregationError(f"the shares from node {src} were addressed from {source} to {destination}")
    return b_share, key_share


def rebuild(shares: list[bytes], group_size: int) -> bytes:
    """A secret from at least ``threshold_for(group_size)`` of its shares."""
    if len(shares) < threshold_for(group_size):
        raise SecureAggregationError(f"{len(shares)} share(s) arrived, {threshold_for(group_size)} are needed")
    try:
        return combine_shares(list(shares))
    except ValueError:
        raise SecureAggregationError("the shares do not rebuild a secret (a share was altered)") from None


# --- masks ----------------------------------------------------------------------------------------------

def mask_stream(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint32 words from AES-256-CTR keyed by the 32-byte ``seed`` (a fixed zero nonce:
    every seed is used for one round's one vector only)."""
    if len(seed) != SEED_BYTES:
        raise SecureAggregationError("a mask seed must be 32 bytes")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * size)) + encryptor.finalize(), dtype=MASKED_DTYPE)


def pair_seed(private: ec.EllipticCurvePrivateKey, public: bytes) -> bytes:
    return base64.urlsafe_b64decode(agreed_key(private, public))


def pair_sign(me: int, other: int) -> int:
    """Of a pair, the site with the smaller node id adds the agreed mask and the other subtracts it."""
    return 1 if me < other else -1


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


@dataclass(frozen=True)
class Quantised:
    """A site's weighted update as integers, and how many of its coordinates the clip range cut."""

    values: np.ndarray   # flat, int64 in 0..QUANT_RANGE
    clipped: int


def quantise(flat_update: np.ndarray, weight: float) -> Quantised:
    """``weight × update``, clipped to ±CLIP_RANGE and stochastically rounded onto 0..QUANT_RANGE (as Flower's
    SecAgg+ quantises: up with probability equal to the fraction, drawn from numpy's global generator)."""
    scaled = np.asarray(flat_update, dtype=np.float64) * weight
    clipped = int(np.count_nonzero(np.abs(scaled) > CLIP_RANGE))
    exact = (np.clip(scaled, -CLIP_RANGE, CLIP_RANGE) + CLIP_RANGE) * (QUANT_RANGE / (2 * CLIP_RANGE))
    rounded = np.ceil(exact).astype(np.int32)
    rounded[np.random.rand(*rounded.shape) < rounded - exact] -= 1
    return Quantised(rounded.astype(np.int64), clipped)


def masked(quantised: np.ndarray, own_seed: bytes, pair_seeds: dict[int, bytes], me: int) -> np.ndarray:
    """quantised + own mask ± every pairwise mask, modulo 2**32."""
    out = quantised.astype(MASKED_DTYPE)
    out += mask_stream(own_seed, out.size)
    for other, seed in pair_seeds.items():
        stream = mask_stream(seed, out.size)
        if pair_sign(me, other) > 0:
            out += stream
        else:
            out -= stream
    return out


def dequantised_sum(total: np.ndarray, summands: int) -> np.ndarray:
    """Σ weight_i × update_i (float64) from the unmasked integer sum of ``summands`` quantised updates.

    Each quantised coordinate is at most QUANT_RANGE, so a sum above ``summands × QUANT_RANGE`` can only
    come from a summand outside the protocol (or a broken mask): the whole sum is refused."""
    if summands > MAX_SITES:
        raise SecureAggregationError(f"{summands} summands could wrap the modulus (at most {MAX_SITES})")
    top = int(total.max()) if total.size else 0
    if top > summands * QUANT_RANGE:
        raise SecureAggregationError("the unmasked sum is out of range: a masked update was not made by the "
                                     "protocol (or a mask was not removed); the sum is refused whole")
    return total.astype(np.float64) * (2 * CLIP_RANGE / QUANT_RANGE) - summands * CLIP_RANGE
