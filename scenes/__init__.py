"""Multi-entity scene composition: layouts, exact box remapping, k and layout sampling."""
