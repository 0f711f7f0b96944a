"""`openalign data inspect` on shards that mix good and bad samples, counted by hand."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from PIL import Image

from conftest import write_tar_shard
from openalign.cli import main
from openalign.errors import OpenAlignError


def encode(mode: str, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (10, 20, 30) if mode == "RGB" else (10, 20, 30, 40)).save(
        buffer, format=fmt)
    return buffer.getvalue()


def test_inspect_counts_every_kind_of_bad_sample_and_reports_truncated_shards(tmp_path, capsys):
    good = encode("RGB", (300, 200))
    write_tar_shard(tmp_path / "00000.tar", [
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
    (tmp_path / "zeros.tar").write_bytes(bytes(10240))  # a valid, empty archive: said to be one
    assert main(["data", "inspect", str(tmp_path / "zeros.tar")]) == 2  # printed, then an exit status a script sees
    printed = capsys.readouterr()
    out = " ".join(printed.out.split())
    assert "1 shard(s) without a sample:" in out and "zeros.tar" in out and "caption characters: none" in out
    assert f"error: no usable sample in {tmp_path / 'zeros.tar'}: training would skip every one" in printed.err


def test_inspect_skips_what_training_skips_repeated_fields_and_upper_case_keys(tmp_path, capsys):
    from conftest import write_members

    good = encode("RGB", (40, 40))
    write_members(tmp_path / "00000.tar", [("a.jpg", good), ("a.JPG", good), ("a.txt", b"one image too many"),
                                           ("b.jpg", good), ("b.TXT", b"an upper-case caption member")])
    assert main(["data", "inspect", str(tmp_path / "00000.tar"), "--json", "--text-key", "TXT"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["usable"], summary["skipped"]) == (1, {"repeated field": 1})


def test_convert_writes_a_table_as_shards_that_inspect_and_the_training_source_read(tmp_path, capsys):
    from openalign.data import ImageTransform, WebDatasetSourceConfig
    from openalign.data.transforms import PreprocessConfig

    (tmp_path / "images").mkdir()
    lines = ["image,caption,synthetic"]
    for index in range(5):
        Image.new("RGB", (24, 24), (index * 50, 0, 0)).save(tmp_path / "images" / f"{index}.png")
        lines.append(f"images/{index}.png,red number {index},a red square")
    lines.append("images/missing.png,lost,x")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    assert main(["data", "convert", str(tmp_path / "pairs.csv"), "--out", str(out), "--samples-per-shard", "2",
                 "--extra-column", "caption=synthetic"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    with tarfile.open(out / "00000.tar") as tar:
        assert tar.getnames() == [f"00000000{i}.{ext}" for i in (0, 1) for ext in ("png", "txt", "caption.txt", "json")]
        assert tar.extractfile("000000001.png").read() == (tmp_path / "images" / "1.png").read_bytes()
        record = json.loads(tar.extractfile("000000001.json").read())  # the raw caption stays img2dataset's
        assert (record["caption"], record["extra"]) == ("red number 1", {"caption": "a red square"})
    assert main(["data", "inspect", str(out / "*.tar"), "--json"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "pairs.csv")]) == 2  # a table, not a shard of it
    assert "pairs.csv' is a table: data inspect reads webdataset tar shards and TFRecord files; write the table's " \
           "pairs as shards with 'openalign data convert" in " ".join(capsys.readouterr().err.split())
    transform = ImageTransform(PreprocessConfig(image_size=24, resize_size=24, random_flip=False), train=False)
    source = WebDatasetSourceConfig(urls=str(out / "{00000..00002}.tar"), image_keys="png",
                                    extra_keys={"caption": "caption.txt"}, shuffle_buffer=1)
    sample = next(iter(source.build(transform, 0)))
    assert sample["text"].startswith("red number") and sample["caption"] == "a red square"
    assert main(["data", "convert", str(tmp_path / "pairs.csv"), "--out", str(out)]) == 2  # never overwrites shards
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sizes.json").write_text("{}")  # nor another dataset's sizes.json
    assert main(["data", "convert", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "other")]) == 2
    assert "already holds shards or a sizes.json" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "other" / "sizes.json").read_text() == "{}"
    with pytest.raises(SystemExit):
        main(["data", "convert", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "x"),
              "--extra-column", "caption"])
    assert "'caption' is not FIELD=COLUMN" in capsys.readouterr().err


def test_convert_writes_every_image_format_and_column_type_the_training_source_reads_back(tmp_path):
    import numpy as np

    from openalign.data import ImageTransform, TableSourceConfig, WebDatasetSourceConfig
    from openalign.data.convert import convert_table
    from openalign.data.transforms import PreprocessConfig

    pixels = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    lines = ["image,caption,class_id"]
    for index, name in enumerate(["a.bmp", "b.tif", "c.gif", "d", "e.jpg"]):  # "d": a JPEG without a suffix
        Image.fromarray(pixels).save(tmp_path / name, format="JPEG" if name in ("d", "e.jpg") else None)
        lines.append(f"{name},picture {index},{index}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    table = TableSourceConfig(path=str(tmp_path / "pairs.csv"), extra_columns={"label": "class_id"})
    convert_table(table, tmp_path / "shards", show_progress=False)
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tar:
        names = tar.getnames()
        assert [name.split(".", 1)[1] for name in names if name.startswith("000000001.")] == [
            "png", "txt", "label.cls", "json"]
        assert [name for name in names if name.endswith((".png", ".jpg"))] == [
            "000000000.png", "000000001.png", "000000002.png", "000000003.jpg", "000000004.jpg"]
        assert tar.extractfile("000000004.jpg").read() == (tmp_path / "e.jpg").read_bytes()  # JPEG bytes unchanged
        lossless = np.asarray(Image.open(tar.extractfile("000000001.png")))
    assert np.array_equal(lossless, np.asarray(Image.open(tmp_path / "b.tif")))
    transform = ImageTransform(PreprocessConfig(image_size=16, resize_size=16, random_flip=False), train=False)
    source = WebDatasetSourceConfig(urls=str(tmp_path / "shards" / "00000.tar"), extra_keys={"label": "label.cls"},
                                    shuffle_buffer=1, open_shards=1)
    samples = [sample for sample, _ in zip(source.build(transform, 0), range(5))]
    assert sorted((sample["text"], sample["label"]) for sample in samples) == [(f"picture {i}", i) for i in range(5)]


def test_convert_skips_and_counts_an_unreadable_image_and_keeps_shards_full(tmp_path, caplog):
    from openalign.data import TableSourceConfig
    from openalign.data.convert import convert_table

    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for name in ("a.png", "broken.jpg", "b.png", "cut.png", "c.png"):
        if name == "broken.jpg":
            (tmp_path / name).write_text("not an image")
        else:
            noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(noise).save(tmp_path / name)
        rows.append({"image": name, "caption": "a picture", "taken": datetime.datetime(2024, 5, 1, 12, 30)})
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:500])  # opens, does not decode
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    table = TableSourceConfig(path=str(tmp_path / "pairs.parquet"), extra_columns={"taken": "taken"})
    sizes = convert_table(table, tmp_path / "shards", samples_per_shard=2, show_progress=False)
    assert sizes == {"00000.tar": 2, "00001.tar": 1}
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar", "00001.tar", "sizes.json"]
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tar:
        assert [name for name in tar.getnames() if name.endswith(".png")] == ["000000000.png", "000000001.png"]
        assert tar.extractfile("000000000.taken.json").read() == b'"2024-05-01 12:30:00"'  # a timestamp as text
        assert json.loads(tar.extractfile("000000001.json").read())["table_row"].endswith("pairs.parquet data row 3")
    assert "skipped 2 of 5 rows whose image cannot be read" in caplog.text
    assert "pairs.parquet data row 2 (broken.jpg): undecodable image: not an image format PIL reads" in caplog.text
    assert "BytesIO" not in caplog.text  # PIL's own message names its in-memory file object
    assert "data row 4 (cut.png)" in caplog.text
    # a file the file system will not read (/proc/self/mem: an I/O error) is one skipped row, not the job's end;
    # rows of image bytes are named by their row in the table, counted before rows without a caption are dropped
    caplog.clear()
    image = (tmp_path / "a.png").read_bytes()
    pq.write_table(pa.table({"image": [image, image, b"corrupt", image], "caption": [" ", "one", "two", "three"]}),
                   tmp_path / "bytes.parquet")
    (tmp_path / "io.csv").write_text("image,caption\na.png,fine\n/proc/self/mem,unreadable\n")
    for name, expected in (("bytes.parquet", "bytes.parquet data row 3 (image bytes): undecodable image"),
                           ("io.csv", "io.csv data row 2: Input/output error")):
        assert convert_table(TableSourceConfig(path=str(tmp_path / name)), tmp_path / f"out_{name}",
                             show_progress=False) == {"00000.tar": 2 if name == "bytes.parquet" else 1}
        assert "skipped 1 of" in caplog.text and expected in caplog.text
    (tmp_path / "none.csv").write_text("image,caption\nbroken.jpg,a picture\n")
    with pytest.raises(OpenAlignError, match="none of the 1 rows of the table has an image that can be read"):
        convert_table(TableSourceConfig(path=str(tmp_path / "none.csv")), tmp_path / "none", show_progress=False)


def test_convert_skips_a_decompression_bomb_as_training_does_and_warns_of_images_a_stream_would_skip(
        tmp_path, caplog, monkeypatch):
    """The webdataset source skips images over PIL's MAX_IMAGE_PIXELS and under min_image_side (10
    px): convert leaves out the first (named as a bomb, not as unreadable), and writes the second
    (a table source trains on it) with a warning."""
    from openalign.data import TableSourceConfig
    from openalign.data.convert import convert_table

    Image.new("RGB", (40, 40)).save(tmp_path / "bomb.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "fine.png")
    Image.new("RGB", (4, 30)).save(tmp_path / "thin.png")
    (tmp_path / "pairs.csv").write_text("image,caption\nbomb.png,one\nfine.png,two\nthin.png,three\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 is over it, 20x20 is not
    with caplog.at_level("WARNING"):
        assert convert_table(TableSourceConfig(path=str(tmp_path / "pairs.csv")), tmp_path / "shards",
                             show_progress=False) == {"00000.tar": 2}
    assert "data row 1 (bomb.png): image too large (decompression bomb)" in caplog.text
    assert ("wrote 1 image(s) whose shorter side is under 10 px, which the webdataset source skips unless its "
            "min_image_side is lowered: ") in caplog.text and "data row 3 (thin.png, 4 px)" in caplog.text


def test_a_csv_quote_left_open_is_an_error_naming_its_row_and_multi_line_captions_are_logged(tmp_path, caplog):
    import gzip

    from openalign.data import TableSourceConfig

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    for name, content, row in (
            ("open.csv", 'image,caption\na.jpg,fine\na.jpg,"open quote\na.jpg,three\na.jpg,four\n', 2),
            # the quote left open in another column, after a legitimate multi-line caption
            ("label.csv", 'image,caption,label\na.jpg,"multi\nline",1\na.jpg,a cow,"2\na.jpg,a cat,3\n', 2)):
        (tmp_path / name).write_text(content)
        with pytest.raises(OpenAlignError, match=f"quote that is never closed: a field of data row {row} opens"):
            TableSourceConfig(path=str(tmp_path / name), extra_columns={"label": "label"} if "label" in name
                              else {}).rows()  # pyarrow alone reads 2 rows of 4
    with gzip.open(tmp_path / "open.csv.gz", "wt") as file:
        file.write((tmp_path / "open.csv").read_text())
    with pytest.raises(OpenAlignError, match="quote that is never closed: a field of data row 2 opens"):
        TableSourceConfig(path=str(tmp_path / "open.csv.gz")).rows()
    # a quote inside an unquoted field is text (CSV opens a quoted field only at its start)
    (tmp_path / "inch.csv").write_text('image,caption\na.jpg,a 12" pizza\na.jpg,a dog\n')
    rows = TableSourceConfig(path=str(tmp_path / "inch.csv")).rows()
    assert [text for _, text, _ in rows] == ['a 12" pizza', "a dog"]
    (tmp_path / "lines.csv").write_text('image,caption\na.jpg,fine\na.jpg,"two\nlines"\na.jpg,"say ""hi"""\n')
    rows = TableSourceConfig(path=str(tmp_path / "lines.csv")).rows()
    assert [text for _, text, _ in rows] == ["fine", "two\nlines", 'say "hi"']
    assert "1 row(s) have fields spanning several lines (the first: data row 2)" in caplog.text


def test_tfrecord_source_streams_every_good_record_once_a_pass_and_counts_the_bad(tmp_path, caplog):
    from tfrecord.writer import TFRecordWriter

    from openalign.data import ImageTransform, TFRecordSourceConfig
    from openalign.data.quality import COUNTS
    from openalign.data.transforms import PreprocessConfig
    from openalign.errors import OpenAlignError

    good = {}
    for file_index in range(2):
        writer = TFRecordWriter(str(tmp_path / f"part-{file_index}.tfrecord"))
        for index in range(4):
            caption = f"image {file_index}-{index}"
            writer.write({"jpg": (encode("RGB", (20, 20)), "byte"), "txt": (caption.encode(), "byte"),
                          "key": (b"x", "byte")})
            good[caption] = True
        writer.write({"jpg": (b"not an image", "byte"), "txt": (b"corrupt", "byte")})
        writer.write({"jpg": (encode("RGB", (20, 20)), "byte"), "txt": (b"  ", "byte")})
        writer.close()
    whole = (tmp_path / "part-1.tfrecord").read_bytes()
    (tmp_path / "part-2.tfrecord").write_bytes(whole[:len(whole) // 3])  # cut inside a record
    transform = ImageTransform(PreprocessConfig(image_size=16, resize_size=16, random_flip=False), train=False)
    config = TFRecordSourceConfig(urls=str(tmp_path / "part-{0..2}.tfrecord"), shuffle_buffer=3, resampled=False)
    from tfrecord.reader import tfrecord_loader

    expected = sorted(good)
    try:  # the good records the cut file still holds whole, read record by record
        for record in tfrecord_loader(str(tmp_path / "part-2.tfrecord"), None, {"txt": "byte"}):
            if bytes(record["txt"]).startswith(b"image"):
                expected.append(bytes(record["txt"]).decode())
    except Exception:  # noqa: BLE001 - the cut
        pass
    before = Counter(COUNTS)
    stream = iter(config.build(transform, 0))
    for _ in range(2):  # two passes: every good record exactly once in each
        assert sorted(next(stream)["text"] for _ in range(len(expected))) == sorted(expected)
    assert "skipped" in caplog.text
    next(stream)  # a round never spans two passes: the second pass's bad records are all judged by now
    counted = Counter(COUNTS) - before
    assert (counted["skipped/undecodable image"], counted["skipped/empty caption"]) == (4, 4)
    assert counted["skipped/truncated or corrupt shard"] >= 2
    with pytest.raises(OpenAlignError, match="the pattern '.*none-\\*.tfrecord' matches no file"):
        TFRecordSourceConfig(urls=str(tmp_path / "none-*.tfrecord")).build(transform, 0)


def test_inspect_reads_tfrecords_by_either_name_and_their_image_key_as_training_does(tmp_path):
    """A '.tfrec' file is a TFRecord too, and a record whose image is under 'png' has none to the
    TFRecord source (image_key 'jpg'): inspect says what training will do."""
    from tfrecord.writer import TFRecordWriter

    from openalign.data.inspect import inspect_shards

    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, "PNG")
    for name, key in (("a.tfrecord", "png"), ("b.tfrec", "jpg")):
        writer = TFRecordWriter(str(tmp_path / name))
        for i in range(3):
            writer.write({key: (png.getvalue(), "byte"), "txt": (f"record {i}".encode(), "byte")})
        writer.close()
    under_png = inspect_shards([str(tmp_path / "a.tfrecord")], show_progress=False)
    assert (under_png["usable"], under_png["skipped"]) == (0, {"no image": 3})
    tfrec = inspect_shards([str(tmp_path / "b.tfrec")], show_progress=False)
    assert (tfrec["usable"], tfrec["failed_shards"]) == (3, {})


def test_a_tfrecords_float_feature_is_an_extra_field(tmp_path):
    """COYO's scores (clip_similarity_vitb32...) are float features, as img2dataset writes them."""
    from tfrecord.writer import TFRecordWriter

    from openalign.data import ImageTransform, TFRecordSourceConfig
    from openalign.data.transforms import PreprocessConfig

    writer = TFRecordWriter(str(tmp_path / "part-0.tfrecord"))
    for index in range(2):
        writer.write({"jpg": (encode("RGB", (20, 20)), "byte"), "txt": (f"image {index}".encode(), "byte"),
                      "clip_similarity_vitb32": (0.25 + index, "float"), "width": (20, "int")})
    writer.close()
    transform = ImageTransform(PreprocessConfig(image_size=16, resize_size=16, random_flip=False), train=False)
    config = TFRecordSourceConfig(urls=str(tmp_path / "part-0.tfrecord"), resampled=False, shuffle_buffer=1,
                                  extra_keys={"sim": "clip_similarity_vitb32", "width": "width"})
    stream = iter(config.build(transform, 0))
    samples = sorted((next(stream) for _ in range(2)), key=lambda sample: sample["text"])
    assert [(sample["sim"], sample["width"]) for sample in samples] == [(0.25, 20), (1.25, 20)]
