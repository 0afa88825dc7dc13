"""Load and run the two bundled MediaPipe TFLite models with OpenCV's DNN module (no mediapipe, no downloads).

OpenCV reads TFLite flatbuffers (``cv2.dnn.readNetFromTFLite``; 4.10 and 5.0 tested).  Its classic engine runs
both models; it takes NCHW float32 blobs although the models were exported NHWC.  Networks are loaded once per process
and thread (a ``cv2.dnn.Net`` is not safe to share between threads).
"""
from __future__ import annotations

import os
import threading

import numpy as np

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
DETECTOR = "face_detection_short_range.tflite"
LANDMARKER = "face_landmark.tflite"

_local = threading.local()


def cv2_module():
    """Import OpenCV or say how to install it."""
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("face detection needs OpenCV: pip install opencv-python-headless  "
                          "(or pip install 'lipforcing[face]')") from e
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromTFLite"):  # pragma: no cover
        raise ImportError(f"OpenCV {cv2.__version__} cannot read TFLite models (needs >= 4.10): "
                          "pip install -U opencv-python-headless")
    return cv2


def net(name: str):
    """The cached ``cv2.dnn.Net`` of a bundled model file."""
    nets = getattr(_local, "nets", None)
    if nets is None:
        nets = _local.nets = {}
    if name not in nets:
        cv2 = cv2_module()
        path = os.path.join(MODELS, name)
        if not os.path.isfile(path):  # pragma: no cover - a broken install
            raise FileNotFoundError(f"{path}: bundled face model missing (reinstall lipforcing)")
        engine = getattr(cv2.dnn, "ENGINE_CLASSIC", None)   # OpenCV 5's new engine returns only one output
        nets[name] = cv2.dnn.readNetFromTFLite(path) if engine is None else cv2.dnn.readNetFromTFLite(path, engine)
    return nets[name]


def run(name: str, blob_nhwc: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """Run model ``name`` on a (N, S, S, 3) float32 batch; returns the named outputs as float32 arrays."""
    n = net(name)
    n.setInput(np.ascontiguousarray(blob_nhwc.transpose(0, 3, 1, 2), dtype=np.float32))
    return [np.asarray(o, np.float32) for o in n.forward(outputs)]
