"""The deployment files under deploy/ parse and say what the design needs.

No Docker, cluster or systemd is used: every file is parsed (YAML, nginx, Dockerfile, unit files)
and checked against the others, and every command line they start is parsed by the real CLI.
(Over 400 lines on purpose: one test per deployment file, all sharing the parsers at the top.)
"""

from __future__ import annotations

import configparser
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "proxy" / "nginx.conf"
DOCKERFILES = {"coordinator": DEPLOY / "docker" / "coordinator.Dockerfile",
               "site": DEPLOY / "docker" / "site.Dockerfile"}
UNITS = {"coordinator": DEPLOY / "systemd" / "carefl-coordinator.service",
         "site": DEPLOY / "systemd" / "carefl-site.service"}

NO_PHONE_HOME = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                 "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
SUPERLINK_HOST, SUPERLINK_PORT = "coordinator", 8000
FLOWER_CHUNK = 5 * 1024 * 1024  # Flower sends arrays as objects of up to 5 MiB


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- YAML -------------------------------------------------------------------------------------
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")
                    and not {"kits", "data"} & set(p.relative_to(DEPLOY).parts))  # local kits/data of compose


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_the_expected_yaml_files_exist():
    names = {_rel(p) for p in YAML_FILES}
    for expected in ("deploy/compose.yaml", "deploy/k8s/kustomization.yaml", "deploy/k8s/namespace.yaml",
                     "deploy/k8s/coordinator.yaml", "deploy/k8s/proxy.yaml", "deploy/k8s/networkpolicy.yaml",
                     "deploy/k8s/site.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{_rel(path)} holds no document"
    assert all(isinstance(d, dict) for d in docs)


# kustomization.yaml is kustomize's own file, not an object sent to the cluster.
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s(paths=K8S_MANIFESTS) -> list[tuple[Path, dict]]:
    return [(p, d) for p in paths for d in _docs(p)]


def _coordinator_side() -> list[tuple[Path, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return _k8s([K8S / name for name in kustomization["resources"]])


def _find(docs, kind: str, name: str) -> dict:
    found = [d for _, d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=_rel)
def test_k8s_documents_name_themselves(path):
    for doc in _docs(path):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"]
        assert isinstance(doc.get("kind"), str) and doc["kind"]
        assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"]


def test_kustomization_lists_the_coordinator_side_only():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert all((K8S / name).is_file() for name in resources)
    assert set(resources) == {"namespace.yaml", "coordinator.yaml", "proxy.yaml", "networkpolicy.yaml"}
    namespace = _find(_k8s([K8S / "namespace.yaml"]), "Namespace", kustomization["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ---- compose ----------------------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _networks(service: dict) -> set[str]:
    assert "network_mode" not in service, "network_mode bypasses the compose networks"
    nets = service.get("networks", ["default"])
    return set(nets) if isinstance(nets, list) else set(nets)


def _environment(env) -> dict[str, str]:
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in (env or {}).items()}


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read_only), from the short volume syntax."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        mounts[target] = (source, "ro" in mode)
    return mounts


def _sites(services: dict) -> list[str]:
    return sorted(name for name in services if name.startswith("site-"))


def test_compose_sites_reach_the_coordinator_only_through_the_proxy():
    compose = _compose()
    services = compose["services"]
    sites = _sites(services)
    assert sites == ["site-a", "site-b"]
    coordinator_nets = _networks(services["coordinator"])
    assert coordinator_nets
    for site in sites:
        site_nets = _networks(services[site])
        assert not site_nets & coordinator_nets, f"{site} shares a network with the coordinator"
        assert site_nets & _networks(services["proxy"]), f"{site} cannot reach the proxy"
    assert coordinator_nets <= _networks(services["proxy"])
    # The coordinator's networks hold nothing but the coordinator and the proxy.
    for name, service in services.items():
        if name not in ("coordinator", "proxy"):
            assert not _networks(service) & coordinator_nets, f"{name} is on the admin network"
    # The SuperLink is not published on the host, and its network has no route out.
    assert "ports" not in services["coordinator"]
    assert all(compose["networks"][net].get("internal") is True for net in coordinator_nets)


def test_compose_services_have_an_image_or_a_build():
    for name, service in _compose()["services"].items():
        assert service.get("image") or service.get("build"), name
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: build context must be the repository root"
            assert (context / service["build"]["dockerfile"]).is_file(), name


def test_compose_turns_off_phone_home_and_runtime_installs():
    services = _compose()["services"]
    for name in ["coordinator", *_sites(services)]:
        env = _environment(services[name].get("environment"))
        for key, value in NO_PHONE_HOME.items():
            assert env.get(key) == value, f"{name}: {key}"


def test_compose_mounts():
    services = _compose()["services"]
    coordinator = _mounts(services["coordinator"])
    assert coordinator["/kit"] == ("./kits/coordinator", True)
    assert coordinator["/state"][0] and not coordinator["/state"][1]
    for site in _sites(services):
        mounts = _mounts(services[site])
        assert mounts["/kit"] == (f"./kits/{site}", True)
        assert mounts["/data"] == (f"./data/{site}", True)
        assert not mounts["/state"][1]
    # Bind mounts of files shipped in the repository point at files that exist.
    for name, service in services.items():
        for source, _ in _mounts(service).values():
            if source.startswith(".") and not source.startswith(("./kits/", "./data/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    proxy = _mounts(services["proxy"])
    assert proxy["/etc/nginx/nginx.conf"] == ("./proxy/nginx.conf", True)


def test_compose_and_k8s_start_what_the_images_start():
    services = _compose()["services"]
    assert services["coordinator"]["command"] == _docker_argv(DOCKERFILES["coordinator"])
    for site in _sites(services):
        assert services[site]["command"] == _docker_argv(DOCKERFILES["site"])
    for name, role in (("carefl-coordinator", "coordinator"), ("carefl-site", "site")):
        (container,) = _find(_k8s(), "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert container["args"] == _docker_argv(DOCKERFILES[role]), name


# ---- nginx ------------------------------------------------------------------------------------
@dataclass
class Directive:
    name: str
    args: list[str]
    block: list["Directive"] | None = None


_NGINX_TOKEN = re.compile(r"""#[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};"'#]+""")


def parse_nginx(text: str) -> list[Directive]:
    tokens = [t for t in _NGINX_TOKEN.findall(text) if not t.startswith("#")]
    pos = 0

    def block(closing: bool) -> list[Directive]:
        nonlocal pos
        out: list[Directive] = []
        words: list[str] = []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok == ";":
                assert words, "empty directive"
                out.append(Directive(words[0], words[1:]))
                words = []
            elif tok == "{":
                assert words, "block without a name"
                out.append(Directive(words[0], words[1:], block(closing=True)))
                words = []
            elif tok == "}":
                assert closing and not words, "unbalanced '}'"
                return out
            else:
                words.append(tok[1:-1] if tok[0] in "\"'" else tok)
        assert not closing and not words, "unterminated block or directive"
        return out

    return block(closing=False)


def _all(block: list[Directive], name: str) -> list[Directive]:
    return [d for d in block if d.name == name]


def _effective(name: str, chain: list[list[Directive]]) -> list[str] | None:
    """nginx inheritance: the innermost level that sets a directive wins."""
    for level in reversed(chain):
        found = _all(level, name)
        if found:
            return found[-1].args
    return None


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


def _bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG])?", value).groups()
    return int(number) * {None: 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit and unit.lower()]


@dataclass
class Location:
    modifier: str  # "" (prefix) or "=" (exact)
    path: str
    chain: list[list[Directive]]  # main, http, server, location blocks

    @property
    def block(self) -> list[Directive]:
        return self.chain[-1]


def _nginx() -> tuple[list[Directive], list[Directive], dict[str, list[str]], list[tuple[list[Directive], list[Location]]]]:
    main = parse_nginx(NGINX_CONF.read_text())
    (http,) = _all(main, "http")
    http_block = http.block
    upstreams = {u.args[0]: [s.args[0] for s in _all(u.block, "server")] for u in _all(http_block, "upstream")}
    servers = []
    for server in _all(http_block, "server"):
        locations = []
        for loc in _all(server.block, "location"):
            assert len(loc.args) in (1, 2), loc.args
            modifier, path = (loc.args[0], loc.args[1]) if len(loc.args) == 2 else ("", loc.args[0])
            # Only prefix and exact matches: the routing simulation below is then exactly nginx's.
            assert modifier in ("", "="), f"regex or named location {loc.args} is not allowed"
            assert not _all(loc.block, "location") and not _all(loc.block, "if"), loc.args
            locations.append(Location(modifier, path, [main, http_block, server.block, loc.block]))
        servers.append((server.block, locations))
    return main, http_block, upstreams, servers


def _route(locations: list[Location], uri: str) -> Location:
    """nginx's choice for prefix/exact locations: an exact match, else the longest prefix."""
    for loc in locations:
        if loc.modifier == "=" and loc.path == uri:
            return loc
    prefixes = [loc for loc in locations if loc.modifier == "" and uri.startswith(loc.path)]
    assert prefixes, f"no location matches {uri}"
    return max(prefixes, key=lambda loc: len(loc.path))


def _proxies_to_superlink(loc: Location, upstreams: dict[str, list[str]]) -> bool:
    target = _effective("proxy_pass", [loc.block])
    if target is None:
        return False
    match = re.fullmatch(r"(https?)://([^/]+)(/.*)?", target[0])
    assert match, target
    host = match.group(2)
    return upstreams.get(host, [host]) == [f"{SUPERLINK_HOST}:{SUPERLINK_PORT}"]


def test_nginx_forwards_only_the_fleet_api_and_health():
    _, http, upstreams, servers = _nginx()
    assert servers, "no server block"
    assert _all(http, "proxy_pass") == []
    for server, locations in servers:
        assert _all(server, "proxy_pass") == [], "proxy_pass outside a location"
        proxied = {(loc.modifier, loc.path) for loc in locations if _effective("proxy_pass", [loc.block])}
        assert proxied == {("", "/v1/fleet/"), ("=", "/health")}
        for loc in locations:
            if (loc.modifier, loc.path) in proxied:
                assert _proxies_to_superlink(loc, upstreams), loc.path
                url = _effective("proxy_pass", [loc.block])[0]
                assert url.startswith("https://"), "the hop to the SuperLink must be TLS"
                # A URI part makes nginx forward the normalised path, under the same prefix.
                assert url.endswith(loc.path), url
        catch_all = _route(locations, "/")
        assert catch_all.path == "/" and catch_all.modifier == ""
        assert _effective("proxy_pass", [catch_all.block]) is None
        assert _effective("return", [catch_all.block])[0] in ("403", "404")

        for uri in ("/v1/fleet/pull-messages", "/v1/fleet/push-object", "/v1/fleet/register-node", "/health"):
            assert _proxies_to_superlink(_route(locations, uri), upstreams), uri
        for uri in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/control/register-supernode",
                    "/v1/runtime/pull-app-inputs", "/v1/runtime/push-app-outputs", "/docs", "/openapi.json",
                    "/redoc", "/v1/fleetx/get-run", "/v1/", "/health/", "/healthz", "/"):
            loc = _route(locations, uri)
            assert _effective("proxy_pass", [loc.block]) is None, f"{uri} reaches the SuperLink"
            assert _effective("return", [loc.block])[0] in ("403", "404"), uri


def test_nginx_verifies_the_superlink_and_suits_flower_traffic():
    _, _, upstreams, servers = _nginx()
    for _, locations in servers:
        for loc in locations:
            if not _proxies_to_superlink(loc, upstreams):
                continue
            chain = loc.chain
            assert _effective("proxy_ssl_verify", chain) == ["on"], loc.path
            assert _effective("proxy_ssl_trusted_certificate", chain)[0].endswith("/ca.crt")
            assert _effective("proxy_ssl_name", chain) == [SUPERLINK_HOST]
            assert _effective("proxy_http_version", chain) == ["1.1"]
            assert _seconds(_effective("proxy_read_timeout", chain)[0]) >= 60
            assert _bytes(_effective("client_max_body_size", chain)[0]) >= 2 * FLOWER_CHUNK
            # The SuperNode's signed headers (flwr-public-key, flwr-timestamp, flwr-signature) pass.
            assert _effective("proxy_pass_request_headers", chain) in (None, ["on"])
            for level in chain:
                for header in _all(level, "proxy_set_header"):
                    assert not header.args[0].lower().startswith("flwr"), f"{header.args[0]} is rewritten"


def test_nginx_serves_tls_with_the_coordinator_certificate_from_the_kit():
    _, _, _, servers = _nginx()
    for server, _ in servers:
        (listen,) = _all(server, "listen")
        assert listen.args[0] == "443" and "ssl" in listen.args
        cert = _all(server, "ssl_certificate")[0].args[0]
        key = _all(server, "ssl_certificate_key")[0].args[0]
        assert Path(cert).name == "coordinator.crt" and Path(key).name == "coordinator.key"
    # compose mounts exactly those kit files where nginx.conf reads them.
    conf = NGINX_CONF.read_text()
    proxy = _mounts(_compose()["services"]["proxy"])
    for name in ("ca.crt", "coordinator.crt", "coordinator.key"):
        path = f"/etc/nginx/kit/{name}"
        assert path in conf
        assert proxy[path] == (f"./kits/coordinator/{name}", True)


def test_the_superlink_name_is_the_same_everywhere():
    """nginx dials coordinator:8000 and checks that name; compose and k8s must provide it."""
    _, _, upstreams, _ = _nginx()
    assert f"{SUPERLINK_HOST}:{SUPERLINK_PORT}" in [s for servers in upstreams.values() for s in servers]
    assert SUPERLINK_HOST in _compose()["services"]
    service = _find(_coordinator_side(), "Service", SUPERLINK_HOST)
    assert service["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [SUPERLINK_PORT]


def test_k8s_configmap_holds_the_same_nginx_conf():
    configmap = _find(_coordinator_side(), "ConfigMap", "carefl-proxy-nginx")
    assert configmap["data"]["nginx.conf"] == NGINX_CONF.read_text()


# ---- Kubernetes -------------------------------------------------------------------------------
def _selects(selector: dict, labels: dict) -> bool:
    assert "matchExpressions" not in selector, "matchExpressions is not evaluated by this test"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _pod_labels(docs, deployment: str) -> dict:
    return _find(docs, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]


def test_k8s_networkpolicy_admits_only_proxy_and_admin_pods_on_port_8000():
    docs = _coordinator_side()
    coordinator = _pod_labels(docs, "carefl-coordinator")
    proxy = _pod_labels(docs, "carefl-proxy")
    policies = [d for _, d in docs if d["kind"] == "NetworkPolicy" and _selects(d["spec"]["podSelector"], coordinator)]
    assert policies, "no NetworkPolicy selects the coordinator pod"
    assert any("Ingress" in p["spec"].get("policyTypes", ["Ingress"]) for p in policies)
    admits_proxy = False
    for policy in policies:  # policies add up: every one that selects the pod must be tight
        for rule in policy["spec"].get("ingress", []):
            ports = [(p["port"], p.get("protocol", "TCP")) for p in rule.get("ports", [])]
            assert ports == [(SUPERLINK_PORT, "TCP")], f"{policy['metadata']['name']} opens {ports or 'all ports'}"
            peers = rule.get("from")
            assert peers, f"{policy['metadata']['name']} admits every source"
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"peer {peer} reaches beyond this namespace's pods"
                labels = peer["podSelector"].get("matchLabels", {})
                assert labels, "an empty podSelector admits every pod"
                is_proxy = _selects(peer["podSelector"], proxy)
                assert is_proxy or labels == {"carefl/role": "admin"}, peer
                admits_proxy |= is_proxy
    assert admits_proxy, "the proxy pods could not reach the SuperLink"


def _kit_from_secrets(pod: dict, container: dict) -> set[str]:
    """The kit is read-only in the container, assembled in memory by an init container from Secrets.

    (A Secret has no subfolders and its files are group-readable; the site agent refuses such a key.)
    Returns the names of the Secrets it is made from.
    """
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = {m["mountPath"]: m for m in container["volumeMounts"]}["/kit"]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["emptyDir"].get("medium") == "Memory"
    (init,) = [c for c in pod.get("initContainers", [])
               if any(m["name"] == mount["name"] for m in c["volumeMounts"])]
    assert "chmod 0600 /kit/*.key" in " ".join(init["args"])
    return {volumes[m["name"]]["secret"]["secretName"] for m in init["volumeMounts"] if "secret" in volumes[m["name"]]}


def test_k8s_coordinator_runs_once_with_persistent_state_and_the_kit():
    docs = _coordinator_side()
    deployment = _find(docs, "Deployment", "carefl-coordinator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claim = volumes[mounts["/state"]["name"]]["persistentVolumeClaim"]["claimName"]
    _find(docs, "PersistentVolumeClaim", claim)
    assert _kit_from_secrets(pod, container) == {"carefl-coordinator-kit", "carefl-coordinator-sites"}
    assert [p["containerPort"] for p in container["ports"]] == [SUPERLINK_PORT]
    # The proxy reads its certificate from the same kit Secret.
    proxy = _find(docs, "Deployment", "carefl-proxy")["spec"]["template"]["spec"]
    tls = [v["secret"] for v in proxy["volumes"] if "secret" in v]
    assert [t["secretName"] for t in tls] == ["carefl-coordinator-kit"]
    assert {i["key"] for i in tls[0]["items"]} == {"ca.crt", "coordinator.crt", "coordinator.key"}


def test_k8s_proxy_is_the_public_entry_on_443():
    docs = _coordinator_side()
    service = _find(docs, "Service", "carefl-proxy")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in service["spec"]["ports"]] == [443]
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(docs, "carefl-proxy"))
    public = [d for _, d in docs if d["kind"] == "Service" and d["spec"].get("type") in ("LoadBalancer", "NodePort")]
    assert [s["metadata"]["name"] for s in public] == ["carefl-proxy"]


def test_k8s_site_template_mounts_data_read_only():
    docs = _k8s([K8S / "site.yaml"])
    pod = _find(docs, "Deployment", "carefl-site")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/data"]["readOnly"] is True
    assert _kit_from_secrets(pod, container) == {"carefl-site-kit"}
    data = volumes[mounts["/data"]["name"]]
    assert "hostPath" in data or data["persistentVolumeClaim"].get("readOnly") is True
    claim = volumes[mounts["/state"]["name"]]["persistentVolumeClaim"]["claimName"]
    _find(docs, "PersistentVolumeClaim", claim)


def _deployments():
    return [(p, d) for p, d in _k8s() if d["kind"] == "Deployment"]


@pytest.mark.parametrize("path,deployment", _deployments(), ids=lambda x: x["metadata"]["name"] if isinstance(x, dict) else _rel(x))
def test_k8s_pods_are_locked_down(path, deployment):
    pod = deployment["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is False
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert ctx.get("runAsNonRoot") is True, container["name"]
        assert ctx.get("allowPrivilegeEscalation") is False
        assert ctx.get("readOnlyRootFilesystem") is True
        assert "ALL" in ctx.get("capabilities", {}).get("drop", [])
        assert not ctx.get("capabilities", {}).get("add")
        assert not ctx.get("privileged")
        image = container["image"]
        assert ":" in image and not image.endswith(":latest"), image
        if image.startswith("carefl/") and container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for key, value in NO_PHONE_HOME.items():
                assert env.get(key) == value, f"{container['name']}: {key}"


# ---- Dockerfiles ------------------------------------------------------------------------------
def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def _docker_argv(path: Path) -> list[str]:
    """ENTRYPOINT + CMD (exec form) without the leading `carefl`."""
    import json

    instructions = dict(parse_dockerfile(path))
    argv = json.loads(instructions["ENTRYPOINT"]) + json.loads(instructions["CMD"])
    assert argv[0] == "carefl"
    return argv[1:]


def _shell_commands(run: str) -> list[list[str]]:
    return [shlex.split(part) for part in re.split(r"&&|;", run) if part.strip()]


def _pip_installs(instructions) -> list[tuple[int, list[str]]]:
    found = []
    for i, (keyword, args) in enumerate(instructions):
        if keyword == "RUN":
            for cmd in _shell_commands(args):
                if cmd[:2] == ["pip", "install"] or cmd[:4] == ["python", "-m", "pip", "install"]:
                    found.append((i, cmd))
    return found


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile(role):
    instructions = parse_dockerfile(DOCKERFILES[role])
    keywords = [k for k, _ in instructions]

    (base,) = [a for k, a in instructions if k == "FROM"]
    name, _, tag = base.partition("@")[0].partition(":")
    assert name == "python" and tag.startswith("3.11") and tag != "latest", base

    installs = _pip_installs(instructions)
    lock = [i for i, cmd in installs if "-r" in cmd and cmd[cmd.index("-r") + 1].endswith("requirements.lock.txt")]
    project = [(i, cmd) for i, cmd in installs if "--no-deps" in cmd and cmd[-1] == "."]
    assert lock, "requirements.lock.txt is not installed"
    assert project, "the project is not installed with --no-deps"
    assert max(lock) < min(i for i, _ in project), "the project must be installed on top of the locked dependencies"
    # Editable: the source tree (with pyproject.toml) is the Flower App `carefl coordinator run`
    # submits; a plain install would leave only site-packages, which is no app folder.
    assert all({"-e", "--editable"} & set(cmd) for _, cmd in project), "the project must be installed with -e"
    copied = " ".join(a for k, a in instructions if k == "COPY")
    for item in ("requirements.lock.txt", "pyproject.toml", "README.md", "server", "client",
                 "shared_models", "privacy", "deploy"):
        assert re.search(rf"(^|\s){re.escape(item)}(\s|$)", copied), f"{item} is not copied"

    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    for key, value in {**NO_PHONE_HOME, "PYTHONUNBUFFERED": "1"}.items():
        assert env.get(key) == value, key

    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    last_run = max(i for i, k in enumerate(keywords) if k == "RUN")
    assert keywords.index("USER") > last_run, "USER must follow the last build step"

    argv = _docker_argv(DOCKERFILES[role])
    assert not {"pip", "uv", "apt-get"} & set(argv), "no package installs when the container starts"
    volumes = [v for k, a in instructions if k == "VOLUME" for v in yaml.safe_load(a)]
    expected = {"/kit", "/state"} | ({"/data"} if role == "site" else set())
    assert set(volumes) == expected
    exposed = [a for k, a in instructions if k == "EXPOSE"]
    assert exposed == (["8000"] if role == "coordinator" else [])


def test_dockerignore_keeps_secrets_and_clutter_out_of_the_build_context():
    patterns = {line.strip().removeprefix("**/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for required in (".venv", "runs", ".git", "__pycache__", "*.fab", "kits"):
        assert required in patterns, required


# ---- systemd ----------------------------------------------------------------------------------
class _MultiValue(dict):
    """configparser dict that keeps every value of a repeated key (e.g. several Environment=)."""

    def __setitem__(self, key, value):
        if key in self and isinstance(value, list) and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, dict_type=_MultiValue,
                                       empty_lines_in_values=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def _unit_environment(unit) -> dict[str, str]:
    env = {}
    for line in unit["Service"]["Environment"].splitlines():
        env.update(item.split("=", 1) for item in shlex.split(line))
    return env


UNIT_ARGV = {
    "coordinator": ["coordinator", "start", "--kit", "/etc/carefl/kit", "--state-dir", "/var/lib/carefl"],
    "site": ["site", "start", "--kit", "/etc/carefl/kit", "--config", "/etc/carefl/kit/site.toml",
             "--log-dir", "/var/lib/carefl/agent"],
}


def _unit_argv(path: Path) -> list[str]:
    argv = shlex.split(parse_unit(path)["Service"]["ExecStart"])
    assert argv[0] == "/opt/carefl/.venv/bin/carefl"
    return argv[1:]


@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_unit(role):
    unit = parse_unit(UNITS[role])
    service = unit["Service"]
    assert _unit_argv(UNITS[role]) == UNIT_ARGV[role]
    env = _unit_environment(unit)
    for key, value in NO_PHONE_HOME.items():
        assert env.get(key) == value, key
    assert service["User"] == "carefl"
    assert service["Restart"] == "on-failure"
    assert _seconds(service["RestartSec"]) > 0
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/carefl" in service["ReadWritePaths"].split()
    assert service["PrivateTmp"] == "yes"
    assert service["ProtectHome"] in ("yes", "true")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if role == "site":
        assert "2" in service["RestartPreventExitStatus"].split()


# ---- every command line parses with the real CLI ---------------------------------------------
def _entrypoints() -> list[tuple[str, list[str]]]:
    cases = [(f"systemd/{path.name}", _unit_argv(path)) for path in UNITS.values()]
    cases += [(f"docker/{path.name}", _docker_argv(path)) for path in DOCKERFILES.values()]
    cases += [(f"compose/{name}", service["command"]) for name, service in _compose()["services"].items()
              if "command" in service]
    for path, deployment in _deployments():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("carefl/"):
                cases.append((f"k8s/{deployment['metadata']['name']}", container["args"]))
    return cases


def _reroot(argv: list[str], tmp_path: Path) -> tuple[list[str], set[Path]]:
    """Absolute paths -> the same paths under tmp_path, created (a file if the name has a suffix).

    The CLI may check that --kit and --config exist; a deployment has them, so the test does too.
    """
    out, created = [], set()
    for arg in argv:
        if arg.startswith("/"):
            path = tmp_path / arg.lstrip("/")
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
            out.append(str(path))
            created.add(path.resolve())
        else:
            out.append(arg)
    return out, created


@pytest.mark.parametrize("source,argv", _entrypoints(), ids=[s for s, _ in _entrypoints()])
def test_command_line_parses_with_the_real_cli(source, argv, tmp_path):
    import click
    import typer

    from deploy.cli import main as cli

    args, paths = _reroot(argv, tmp_path)
    command, names = typer.main.get_command(cli.app), ["carefl"]
    while isinstance(command, click.Group):
        name = args.pop(0)
        assert name in command.commands, f"`{' '.join(names)}` has no sub-command {name!r} ({source})"
        command = command.commands[name]
        names.append(name)
    ctx = command.make_context(names[-1], args, resilient_parsing=False)
    # Every path on the command line was taken by an option (not silently dropped).
    values = {Path(str(v)).resolve() for v in ctx.params.values() if isinstance(v, (str, Path))}
    assert paths <= values, f"{source}: {sorted(map(str, paths - values))} not parsed as option values"
