"""radforge: CT and X-ray DICOM corpora to foundation models."""

__version__ = "0.1.0"
