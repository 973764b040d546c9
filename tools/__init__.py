"""Tools of the project (CI runners), run from a clone: not part of the wheel."""
