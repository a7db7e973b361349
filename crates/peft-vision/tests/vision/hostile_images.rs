//! Malformed image files give a clear error naming the file, never a panic or an allocation
//! sized by what the file declares (docs/reliability.md, "Images").

use std::path::{Path, PathBuf};

use peft_vision::{RgbImage, VisionError};

fn fixture_image() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/clip/test_image.png")
}

use peft_io::scratch::ScratchFile as TempFile;

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header declares `width × height` RGB pixels, followed by a tiny data chunk.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        bytes.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        bytes.extend(&body);
        bytes.extend(crc32(&body).to_be_bytes());
    };
    let mut header = Vec::new();
    header.extend(width.to_be_bytes());
    header.extend(height.to_be_bytes());
    header.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &header);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    bytes
}

fn image_error(path: &Path) -> String {
    match RgbImage::open(path) {
        Err(error @ VisionError::Image { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains(&path.display().to_string()),
                "names the file: {message}"
            );
            message
        }
        Err(other) => panic!("expected an image error, got {other}"),
        Ok(image) => panic!("accepted {}x{}", image.width, image.height),
    }
}

#[test]
fn the_fixture_image_decodes() {
    let image = RgbImage::open(fixture_image()).unwrap();
    assert_eq!(image.pixels.len(), image.width * image.height * 3);
}

#[test]
fn empty_and_non_image_files_are_refused() {
    let empty = TempFile::new("empty.png", b"");
    image_error(empty.path());
    let text = TempFile::new("text.png", b"this is not an image\n");
    image_error(text.path());
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let noise = TempFile::new("noise.jpg", &bytes);
    image_error(noise.path());
}

#[test]
fn truncated_png_is_refused() {
    let bytes = std::fs::read(fixture_image()).unwrap();
    for keep in [8, 33, bytes.len() / 2, bytes.len() - 13] {
        let file = TempFile::new(&format!("truncated-{keep}.png"), &bytes[..keep]);
        image_error(file.path());
    }
}

#[test]
fn huge_declared_dimensions_are_refused_without_allocating_them() {
    // 100,000² RGB pixels would be 30 GB; the decoder's allocation limit refuses the header.
    let file = TempFile::new("huge.png", png_declaring(100_000, 100_000));
    let message = image_error(file.path());
    assert!(message.to_lowercase().contains("limit"), "{message}");
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let path = std::env::temp_dir().join("peft-vision-no-such-image.png");
    let error = RgbImage::open(&path).unwrap_err();
    assert!(matches!(error, VisionError::Io { .. }), "{error}");
    assert!(
        error.to_string().contains("peft-vision-no-such-image.png"),
        "{error}"
    );
}
