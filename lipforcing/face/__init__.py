"""Real videos in and out: face detection, tracking, alignment to the model's crop, the mouth mask, paste-back.

Modules (one job each)::

    detect.py     BlazeFace short-range (bundled TFLite, run by OpenCV DNN): boxes + 6 keypoints, anchors decoded here
    landmarks.py  MediaPipe Face Mesh (bundled TFLite): 468 points in a rotated square region
    track.py      pick the face (largest / face_index / box), follow it (landmarks, IoU), smooth the transform,
                  reset on scene cuts and lost faces
    align.py      anchors -> similarity -> crop affine (LatentSync geometry); torch warp that cuts the crops
    mask.py       the mouth mask: procedural default, user mask image (white = keep), latent channel
    paste.py      inverse warp + eroded, feathered blend back into the frame (torch, any device)
    pipeline.py   FacePipeline: frames -> crops + transforms, generated crops -> full frames
    pingpong.py   reference frame order when speech outlasts the reference clip

The two models (Apache-2.0, from the mediapipe 0.10.21 wheel) and their notice live in ``models/``.
"""
from lipforcing._lazy import lazy_attributes
from lipforcing.face.mask import MIN_MASK_SIZE, keep_mask, latent_mask, load_mask, mouth_mask
from lipforcing.face.pingpong import pingpong_index

__all__ = ["mouth_mask", "keep_mask", "latent_mask", "load_mask", "MIN_MASK_SIZE", "pingpong_index",
           "Detection", "detect_faces", "FaceTracker", "FaceTrack", "FacePipeline", "FaceError"]

__getattr__ = lazy_attributes(globals(), {
    "Detection": "lipforcing.face.detect",
    "detect_faces": "lipforcing.face.detect",
    "FaceTracker": "lipforcing.face.track",
    "FaceTrack": "lipforcing.face.track",
    "FaceError": "lipforcing.face.track",
    "FacePipeline": "lipforcing.face.pipeline",
})
