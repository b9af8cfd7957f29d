"""Public data sets and demo sites: download with checksums, synthetic extracts, DICOM conversion.
Used by the command line only; never part of the app bundle."""
