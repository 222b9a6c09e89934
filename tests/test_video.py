"""engine.video: the one video reader that streaming (engine.stream) and training (train.data) share."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from damaged_video import damaged_copy, decodable
from engine.errors import VideoOpenError
from engine.video import VideoReader, camera_index


def _opencv_frames(path, n: int) -> list[np.ndarray]:
    """The first ``n`` frames read straight through OpenCV, converted from BGR (the oracle)."""
    cap = cv2.VideoCapture(str(path))
    out = [cv2.cvtColor(cap.read()[1], cv2.COLOR_BGR2RGB) for _ in range(n)]
    cap.release()
    return out


def test_streaming_and_training_read_with_the_same_reader(shared_data):
    import engine.stream
    from train.data import VideoSource, open_video

    assert engine.stream.VideoReader is VideoReader and issubclass(VideoSource, VideoReader)
    video = shared_data / "video" / "bikes.mp4"
    expected = _opencv_frames(video, 12)
    for reader in (VideoReader(video), VideoReader(video, threads=1), open_video(video)):
        with reader:
            assert (reader.size, reader.fps, reader.frame_count) == ((640, 272), 25.0, 250)
            got = list(reader.frames(max_frames=12))
        assert len(got) == 12 and all(np.array_equal(g, e) for g, e in zip(got, expected)), reader


def test_a_damaged_file_is_warned_about_once_by_whoever_reads_it(shared_data, tmp_path):
    from train.data import load_images, open_video

    video = damaged_copy(shared_data / "video" / "bikes.mp4", tmp_path / "damaged.mp4", keep=0.15)
    listed, n = decodable(video)
    assert listed == 250 and 0 < n < 100
    message = rf"damaged.mp4: the decoder ended after {n} of the {listed} frames its container lists"
    reader = VideoReader(video)
    with pytest.warns(RuntimeWarning, match=message):
        assert len(list(reader.frames())) == n
    assert reader.ended_early
    # training goes round the file: the early end is said once, and each pass starts again at frame 0
    with warnings.catch_warnings(record=True) as seen, open_video(video) as source:
        warnings.simplefilter("always")
        looped = list(source.frames(loop=True, max_frames=2 * n + 5))
    assert [str(w.message) for w in seen if "decoder ended" in str(w.message)] == [
        f"video file {video}: the decoder ended after {n} of the {listed} frames its container lists (a truncated "
        f"or damaged file?)"]
    assert len(looped) == 2 * n + 5 and np.array_equal(looped[n], looped[0]) and np.array_equal(looped[2 * n], looped[0])
    with pytest.warns(RuntimeWarning, match=message):
        assert len(load_images("video", video)) == n


def test_open_errors_say_what_was_found(tmp_path):
    with pytest.raises(VideoOpenError, match=r"video file not found: .*gone.mp4 \(no such file\)"):
        VideoReader(tmp_path / "gone.mp4")
    with pytest.raises(VideoOpenError, match=rf"video file not found: {tmp_path} \(it is a folder\)"):
        VideoReader(tmp_path)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoOpenError, match=r"OpenCV could not open video file .*junk.mp4 \(not a video"):
        VideoReader(tmp_path / "junk.mp4", threads=1)
    assert [camera_index(s) for s in (0, " 2 ", np.int64(3), "0.mp4", True, tmp_path)] == [0, 2, 3, None, None, None]
