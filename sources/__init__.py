"""Where images and their labels come from."""
