"""A folder of generated bad (and awkward but valid) input files, with the outcome each must have.

`write_bad_images(folder)` writes every kind below and returns them as `BadImage`s: `decodes` (the file must be
decoded to the expected grayscale content) or `error` (a regular expression the `ValueError` must match; it must
also name the file). Everything is small on disk; the over-large images are written row by row (PNG) or built from
their header (a decompression bomb), so generating them needs little memory.
"""

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image


@dataclass(frozen=True)
class BadImage:
    kind: str
    path: Path
    error: str | None = None  # None: must decode; else a regex of the error message
    size: tuple[int, int] | None = None  # (width, height) it must decode to, when it decodes

    @property
    def decodes(self) -> bool:
        return self.error is None


def gradient(width: int = 48, height: int = 40) -> np.ndarray:
    """A deterministic 8-bit test image (not constant, so min-max scalings are defined)."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 5 + y * 3) % 256).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_rows(path: Path, width: int, height: int, bit_depth: int, row: bytes) -> Path:
    """A grayscale PNG whose rows all hold `row` (raw bytes), compressed row by row (little memory for big images)."""
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(b"\0" + row) for _ in range(height)]
    data = b"".join(chunks) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    )
    return path


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                float_pixels: np.ndarray | None = None, **elements) -> Path:  # fmt: skip
    """A minimal uncompressed secondary-capture DICOM file (integer `pixels`, or 32-bit `float_pixels`)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    if float_pixels is not None:
        dataset.Rows, dataset.Columns = float_pixels.shape
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.BitsAllocated = 1, photometric, 32
        dataset.FloatPixelData = float_pixels.astype("<f4").tobytes()
    else:
        dataset.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_bad_images(folder: Path) -> list["BadImage"]:
    """Write every kind of bad or awkward image file into `folder`; returns them with their expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = gradient()
    size = (gray.shape[1], gray.shape[0])
    images: list[BadImage] = []

    def add(kind: str, path: Path, error: str | None = None, decoded_size: tuple[int, int] | None = size) -> None:
        images.append(BadImage(kind, path, error, None if error else decoded_size))

    # --- undecodable files: a clear error naming them
    jpeg = folder / "good.jpg"
    PIL.Image.fromarray(gray).save(jpeg, quality=95)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    add("truncated JPEG", truncated, "truncated")
    (folder / "zero_byte.png").write_bytes(b"")
    add("zero-byte file", folder / "zero_byte.png", r"empty \(0 bytes\)")
    (folder / "text_as.jpg").write_text("FINDINGS: no acute cardiopulmonary process.\n")
    add("text file named .jpg", folder / "text_as.jpg", "cannot identify image file")
    add("missing file", folder / "missing.png", "does not exist")
    noise = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(folder / "whole.png")
    whole = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.png").unlink()
    add("PNG cut in half", folder / "truncated.png", "truncated")
    nan = np.linspace(0, 1, gray.size, dtype=np.float32).reshape(gray.shape)
    nan[5, 5] = np.nan
    PIL.Image.fromarray(nan, mode="F").save(folder / "nan_float.tiff")
    add("float TIFF with a NaN", folder / "nan_float.tiff", "NaN")

    # --- over-large images: refused before they are decoded (or decoded reduced: JPEG)
    write_png_rows(folder / "bomb_400mp.png", 20_000, 20_000, 1, bytes(2_500))
    add("decompression bomb (20,000 x 20,000 PNG, PIL's bomb check)", folder / "bomb_400mp.png", "decompression-bomb")
    write_png_rows(folder / "huge_16bit.png", 10_000, 10_000, 16, np.full(10_000, 1000, ">u2").tobytes())
    add("16-bit 10,000 x 10,000 PNG", folder / "huge_16bit.png", "over the limit of 50,000,000")
    big_jpeg = folder / "big_8000.jpg"
    y, x = np.ogrid[0:8000, 0:8000]
    PIL.Image.fromarray(((x // 40 + y // 40) % 256).astype(np.uint8)).save(big_jpeg, quality=50)
    add("64-megapixel JPEG (decoded at 1/2 scale)", big_jpeg, decoded_size=(4000, 4000))

    # --- awkward but valid: decoded
    PIL.Image.fromarray(gray).convert("P").save(folder / "palette.png")
    add("palette PNG", folder / "palette.png")
    palette = PIL.Image.fromarray(gray).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette_transparent.png", transparency=0)
    add("palette PNG with transparency", folder / "palette_transparent.png")
    PIL.Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], axis=-1), "RGBA").save(folder / "rgba.png")
    add("RGBA PNG", folder / "rgba.png")
    PIL.Image.fromarray(gray).convert("CMYK").save(folder / "cmyk.jpg")
    add("CMYK JPEG", folder / "cmyk.jpg")
    PIL.Image.fromarray(gray.astype(np.float32) / 255.0, mode="F").save(folder / "float.tiff")
    add("float TIFF", folder / "float.tiff")
    PIL.Image.fromarray(gray.astype(np.uint16) * 16).save(folder / "twelve_bit.png")
    add("12-bit data in a 16-bit PNG", folder / "twelve_bit.png")
    PIL.Image.fromarray(gray).save(folder / "jpeg_named.png", format="JPEG")
    add("JPEG named .png", folder / "jpeg_named.png")
    frames = [PIL.Image.fromarray(gray), PIL.Image.fromarray(255 - gray)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    add("animated GIF (first frame)", folder / "animated.gif")
    PIL.Image.fromarray(gray).save(folder / "image.bmp")
    add("BMP", folder / "image.bmp")

    # --- DICOM
    stored = gray.astype(np.uint16) * 16
    write_dicom(folder / "plain.dcm", stored, WindowCenter=2040, WindowWidth=4081)
    add("DICOM", folder / "plain.dcm")
    write_dicom(folder / "dicom_without_suffix", stored)
    add("extensionless DICOM", folder / "dicom_without_suffix")
    write_dicom(folder / "monochrome1.dcm", 4095 - stored, "MONOCHROME1")
    add("MONOCHROME1 DICOM", folder / "monochrome1.dcm")
    write_dicom(folder / "multi_frame.dcm", np.stack([stored, 4095 - stored]), NumberOfFrames=2)
    add("multi-frame DICOM (first frame)", folder / "multi_frame.dcm")
    write_dicom(folder / "window_width_0.dcm", stored, WindowCenter=100, WindowWidth=0)
    add("DICOM with WindowWidth 0", folder / "window_width_0.dcm", "WindowWidth is 0")
    write_dicom(folder / "nan_pixels.dcm", None, float_pixels=np.where(gray == 7, np.nan, gray / 255.0))
    add("DICOM with NaN float pixels", folder / "nan_pixels.dcm", "NaN")
    (folder / "malformed.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"garbage" * 20)
    add("malformed DICOM", folder / "malformed.dcm", "Could not read the DICOM file")
    (folder / "truncated.dcm").write_bytes((folder / "plain.dcm").read_bytes()[:-1000])
    add("truncated DICOM", folder / "truncated.dcm", "Could not read the DICOM file")
    huge = write_dicom(folder / "huge_header.dcm", np.zeros((2, 2), np.uint16))
    data = huge.read_bytes()  # claim 60,000 x 60,000 pixels: refused on the header, before the pixel data
    rows, columns = struct.pack("<HHH", 0x0028, 0x0010, 0x5355), struct.pack("<HHH", 0x0028, 0x0011, 0x5355)
    data = data.replace(rows + struct.pack("<HH", 2, 2), rows + struct.pack("<HH", 2, 60_000))
    data = data.replace(columns + struct.pack("<HH", 2, 2), columns + struct.pack("<HH", 2, 60_000))
    huge.write_bytes(data)
    add("DICOM header claiming 60,000 x 60,000 pixels", huge, "over the limit")
    return images


BAD_TEXTS = [
    (7, r"text #0 is of type int \(7\), expected a string"),
    (b"no effusion", r"text #0 is of type bytes, expected a string: decode it first"),
    ("no \ud83d effusion", r"text #0 contains an unpaired surrogate '\\ud83d' at position 3"),
    ("   ", r"text #0 is empty"),
    (None, r"text #0 is of type NoneType"),
]
"""Bad report / prompt texts and the error the processor gives for each (as text #0)."""
