"""Models: cards, backends, the registry and the YOLO-style family."""
