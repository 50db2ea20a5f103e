"""Names shared across the harness and the methods (each defined once)."""

SPLITS = ("train", "val", "test")
TOWERS = ("img", "txt")  # image tower and text head of a student
SIMILARITY_KINDS = ("none", "full", "lowrank")  # learned target similarity of a distilled set
