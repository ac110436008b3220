"""Structure signals (canny, depth, sketch) for the structure controller (models/control)."""
