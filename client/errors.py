"""Errors a site reports in words a hospital engineer can act on.

Messages name the file, line and reason, never a value read from patient data. They stay at the
site (its log, its CLI): a file path can itself identify a patient, so the coordinator is told only
the class's ``public`` sentence.
"""


class SiteError(Exception):
    """A problem at the site that the site's staff must fix (data, configuration)."""

    public = "the site's configuration or data has a problem"


class DataNotFoundError(SiteError):
    """The data directory or a data file is missing."""

    public = "the site's data is missing"


class DataFormatError(SiteError):
    """A data file exists but does not have the expected content."""

    public = "the site's data is malformed"
