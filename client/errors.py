"""Errors a site reports in words a hospital engineer can act on.

Messages name the file, line and reason, never a value read from patient data.
"""


class SiteError(Exception):
    """A problem at the site that the site's staff must fix (data, configuration)."""


class DataNotFoundError(SiteError):
    """The data directory or a data file is missing."""


class DataFormatError(SiteError):
    """A data file exists but does not have the expected content."""
