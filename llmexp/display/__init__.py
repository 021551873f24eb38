"""What a person sees: the console (banners, tables, one-paragraph errors), progress, and libraries kept quiet."""
