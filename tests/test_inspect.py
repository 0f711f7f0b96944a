"""`openalign data inspect` on shards that mix good and bad samples, counted by hand."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image

from openalign.cli import main


def encode(mode: str, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (10, 20, 30) if mode == "RGB" else (10, 20, 30, 40)).save(
        buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_inspect_counts_every_kind_of_bad_sample_and_reports_truncated_shards(tmp_path, capsys):
    good = encode("RGB", (300, 200))
    write_shard(tmp_path / "00000.tar", [
        ("a", {"jpg": good, "txt": b"a good caption", "json": b"{}"}),
        ("b", {"jpg": encode("L", (40, 40)), "txt": b"grayscale is fine"}),
        ("c", {"png": encode("RGBA", (2000, 1000), "PNG"), "txt": "caf\u00e9 with alpha".encode()}),
        ("d", {"jpg": good[:len(good) // 2], "txt": b"truncated jpeg"}),
        ("e", {"jpg": b"not an image", "txt": b"corrupt"}),
        ("f", {"jpg": good, "txt": b"   "}),
        ("g", {"jpg": good, "txt": b"\xff\xfe latin-1 bytes"}),
        ("h", {"jpg": good}),
        ("i", {"txt": b"no image"}),
    ])
    with tarfile.open(tmp_path / "00000.tar") as tar:
        cut = tar.getmember("d.jpg").offset_data + 10
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00000.tar").read_bytes()[:cut])  # a copy cut inside d.jpg
    assert main(["data", "inspect", str(tmp_path / "{00000..00001}.tar"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # the cut copy's a, b and c arrive before the cut (as they would in training), then the shard fails
    assert (summary["shards"], summary["samples"], summary["usable"]) == (2, 12, 6)
    assert summary["skipped"] == {"undecodable image": 2, "empty caption": 1, "caption not UTF-8": 1,
                                  "no caption": 1, "no image": 1}
    assert list(summary["failed_shards"]) == [str(tmp_path / "00001.tar")]
    assert summary["image_modes"] == {"RGB": 2, "L": 2, "RGBA": 2}
    assert summary["image_longer_side"]["256-511"] == 2 and summary["image_longer_side"][">=2048"] == 0
    assert summary["image_longer_side"]["1024-2047"] == 2 and summary["image_longer_side"]["32-63"] == 2
    assert summary["caption_chars"]["10-19"] == 7 and summary["caption_chars"]["1-9"] == 1  # every readable caption
    assert main(["data", "inspect", str(tmp_path / "00000.tar")]) == 0
    assert "9 samples, 3 usable" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "missing.tar")]) == 2
