"""A long stream (200+ chunks) on a very small engine: memory stays flat, frame count and timestamps stay exact."""
import gc
import tracemalloc
import warnings

import numpy as np
import torch

from tests.stream.helpers import reference_frames, speech

P = 640


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable from Python objects."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # isinstance() on some lazy modules warns
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    from torch._subclasses.fake_tensor import FakeTensor

    for obj in objs:
        try:
            if obj.is_meta or isinstance(obj, FakeTensor):  # fake tensors (left by opcheck tests) own no memory
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - some tensor subclasses cannot expose a storage
            continue
        key = (st.data_ptr(), st.device)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def test_200_chunks_memory_flat_and_no_drift(small_engine):
    n_chunks = 205
    ref = reference_frames(11, seed=3)
    s = small_engine.session(ref, seed=7)
    # 200+ chunks of audio pushed in 20 ms pieces with a varying phase, drained every 12 pieces
    total = P * (9 + 12 * (n_chunks - 1)) + 160
    piece = 320
    # a deterministic signal we can regenerate per frame to check the pairing without keeping it all
    base = speech(P * 50, seed=4)

    def audio_at(a, b):
        idx = np.arange(a, b) % base.size
        return base[idx]

    count, pushed, chunk_ids = 0, 0, set()
    tensor_bytes, py_bytes = {}, {}
    tracemalloc.start()
    try:
        while pushed < total:
            n = min(piece, total - pushed)
            s.push_audio(audio_at(pushed, pushed + n))
            pushed += n
            if (pushed // piece) % 12 == 0 or pushed == total:
                for f in s.frames(block=True):
                    assert f.index == count
                    assert f.pts == count / 25                      # exact: index / fps, no accumulation
                    np.testing.assert_array_equal(f.audio, audio_at(count * P, (count + 1) * P))
                    chunk_ids.add(f.chunk_id)
                    count += 1
                k = len(chunk_ids)
                if k in (40, n_chunks) and k not in tensor_bytes:
                    tensor_bytes[k] = live_tensor_bytes()
                    py_bytes[k] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(chunk_ids) == n_chunks
    assert count == 9 + 12 * (n_chunks - 1)                         # exactly one frame per 640 samples
    assert s.buffered_samples == 160                                # only the lookahead of the next chunk
    # flat memory: tensors identical in size between chunk 40 and chunk 205; Python heap within 256 KiB
    assert tensor_bytes[n_chunks] <= tensor_bytes[40] + 4096, tensor_bytes
    assert py_bytes[n_chunks] <= py_bytes[40] + 256 * 1024, py_bytes
    s.end_of_speech()
    rest = list(s.frames())
    assert [f.index for f in rest] == [count]                       # the 160 lookahead samples: one more frame
    s.close()
