"""Student dual encoders: image towers (configs as JSON), text projection head, functional flat-parameter view."""

from benchmark.models.student import DualEncoder, FlatStudent, build_student, StudentConfig
from benchmark.models.towers import available_towers, build_image_tower, load_tower_config

__all__ = ["DualEncoder", "FlatStudent", "build_student", "StudentConfig", "available_towers",
           "build_image_tower", "load_tower_config"]
