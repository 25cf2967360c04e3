"""Generic machinery shared by every method. No method name appears in this package."""
