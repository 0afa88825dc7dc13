"""BlazeFace decoding (anchors, boxes, weighted NMS) against plain oracles, and detection on real pictures placed in
720p frames of both orientations at random positions, scales and small rotations."""
import numpy as np
import pytest

from lipforcing.face import detect, landmarks
from lipforcing.face.align import anchors_from_landmarks
from tests.face.helpers import apply, astronaut, background, fresh_rng, placement, procedural_face, render


def test_anchors_layout():
    a = detect.anchors()
    assert a.shape == (896, 2)
    # stride 8: 16x16 cells, 2 anchors each, row-major; stride 16: 8x8 cells, 6 each
    np.testing.assert_allclose(a[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(a[1], a[0])
    np.testing.assert_allclose(a[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(a[511], [15.5 / 16, 15.5 / 16])
    np.testing.assert_allclose(a[512:518], np.tile([0.5 / 8, 0.5 / 8], (6, 1)))
    np.testing.assert_allclose(a[-1], [7.5 / 8, 7.5 / 8])


def test_decode_matches_loop_oracle():
    rng, seed = fresh_rng()
    reg = rng.normal(0, 20, (896, 16)).astype(np.float32)
    logits = rng.normal(0, 3, 896).astype(np.float32)
    boxes, scores, kps = detect.decode(reg, logits, min_score=0.6)
    anc = detect.anchors()
    want = []
    for i in range(896):
        s = 1 / (1 + np.exp(-float(logits[i])))
        if s < 0.6:
            continue
        cx, cy = reg[i, 0] / 128 + anc[i, 0], reg[i, 1] / 128 + anc[i, 1]
        w, h = reg[i, 2] / 128, reg[i, 3] / 128
        k = [(reg[i, 4 + 2 * j] / 128 + anc[i, 0], reg[i, 5 + 2 * j] / 128 + anc[i, 1]) for j in range(6)]
        want.append(([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], s, k))
    assert len(want) == len(scores) > 0, seed
    np.testing.assert_allclose(boxes, [w[0] for w in want], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, [w[1] for w in want], rtol=1e-6)
    np.testing.assert_allclose(kps, [w[2] for w in want], rtol=1e-5, atol=1e-6)


def test_weighted_nms_and_iou():
    assert detect.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert detect.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.6, 0.7])
    kps = np.zeros((3, 6, 2))
    kps[1] += 1
    out = detect.weighted_nms(boxes, scores, kps)
    assert len(out) == 2
    np.testing.assert_allclose(out[0][0], [0.4, 0, 10.4, 10])          # score-weighted mean of the overlapping pair
    assert out[0][1] == 0.9 and out[1][1] == 0.7
    np.testing.assert_allclose(out[0][2], 0.4)


@pytest.mark.parametrize("size", [(720, 1280), (1280, 720)])
@pytest.mark.parametrize("kind", ["astronaut", "procedural"])
def test_detect_placed_faces(kind, size):
    """The face is found wherever it is placed, and its landmarks' anchors land where the placement puts the
    source picture's own anchors (within 6 % of the brow-to-brow distance)."""
    rng, seed = fresh_rng()
    src = astronaut() if kind == "astronaut" else procedural_face()
    H, W = size
    ref = landmarks.face_landmarks(src, landmarks.roi_from_detection(detect.detect_faces(src)[0]))[0]
    src_anchors = anchors_from_landmarks(landmarks.face_landmarks(src, landmarks.roi_from_landmarks(ref))[0])
    for _ in range(3):
        scale = rng.uniform(1.1, 2.2)
        half = scale * max(src.shape[:2]) / 2
        centre = (rng.uniform(half, W - half), rng.uniform(half, H - half))
        G = placement(src.shape, centre, scale, rng.uniform(-10, 10))
        frame = render(src, background(H, W, rng), G)
        dets = detect.detect_faces(frame)
        assert dets, f"no face found (seed {seed}, scale {scale:.2f}, centre {centre})"
        # the placed face is the most confident detection: detect_faces lists the largest first, and in about 1
        # portrait frame in 70 a larger false box scoring just above MIN_SCORE (0.50-0.56, vs 0.95+ for the face)
        # came first (the tracker drops such boxes: landmark confirmation)
        d = max(dets, key=lambda d: d.score)
        want = apply(G, src_anchors)
        assert d.box[0] < want[:, 0].min() and d.box[2] > want[:, 0].max(), seed
        pts, presence = landmarks.face_landmarks(frame, landmarks.roi_from_detection(d))
        assert presence > 0.9, seed
        pts, _ = landmarks.face_landmarks(frame, landmarks.roi_from_landmarks(pts))   # re-centred, as tracking does
        brows = np.linalg.norm(want[1] - want[0])
        assert np.abs(anchors_from_landmarks(pts) - want).max() < 0.06 * brows, seed


def test_detect_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect.detect_faces(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect.detect_faces(np.zeros((32, 32), np.uint8))
    rng, _ = fresh_rng()
    assert detect.detect_faces(background(360, 640, rng)) == []
