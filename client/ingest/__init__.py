"""Reading a site's data: EHR extracts, the heart-disease files, imaging volumes (DICOM, NIfTI) and masks."""
