"""The shapes that flow: the box type, its codecs, records and their Arrow schemas."""
