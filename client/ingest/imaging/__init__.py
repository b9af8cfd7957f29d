"""Medical-imaging ingestion at a site: DICOM series, NIfTI, DICOM SEG masks, all as (z, y, x) volumes in LPS."""
