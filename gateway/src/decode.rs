//! Decoding image bytes (JPEG, PNG, WebP, GIF first frame, BMP) into upright RGB.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// Why bytes could not become an image.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not in a format we decode.
    #[error("not a supported image (JPEG, PNG, WebP, GIF or BMP expected)")]
    UnknownFormat,
    /// The header announces more pixels than allowed.
    #[error("image is {width}x{height} = {pixels} pixels, more than the limit of {limit}")]
    TooManyPixels {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// Their product.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The image is damaged or uses an unsupported feature of its format.
    #[error("corrupt or unsupported image: {0}")]
    Corrupt(String),
}

/// Decodes `bytes`, refusing images over `max_pixels` before any pixel is decoded, and applies the EXIF
/// orientation. Greyscale is replicated to RGB and alpha dropped, as the reference recipe does.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    match reader.format() {
        Some(
            ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp,
        ) => {}
        _ => return Err(DecodeError::UnknownFormat),
    }
    // A second guard inside the decoders, for allocations the header does not announce.
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(64 * 1024 * 1024));
    reader.limits(limits);

    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    if pixels == 0 {
        return Err(DecodeError::Corrupt("image has no pixels".into()));
    }
    // A broken EXIF block should not cost the user the prediction: fall back to no rotation.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

fn corrupt(e: image::ImageError) -> DecodeError {
    match e {
        image::ImageError::Unsupported(_) => DecodeError::Corrupt(e.to_string()),
        image::ImageError::Limits(_) => {
            DecodeError::Corrupt(format!("image exceeds decoder limits: {e}"))
        }
        _ => DecodeError::Corrupt(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, Rgba};

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn sample() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(16, 8, |x, y| {
            Rgb([x as u8 * 10, y as u8 * 20, 100])
        }))
    }

    #[test]
    fn decodes_every_supported_format() {
        for format in [
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Bmp,
            ImageFormat::Gif,
            ImageFormat::WebP,
        ] {
            let image = decode(&encode(&sample(), format), 1_000_000).unwrap();
            assert_eq!(image.dimensions(), (16, 8), "{format:?}");
        }
    }

    #[test]
    fn greyscale_and_alpha_become_rgb() {
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 4, image::Luma([77])));
        let decoded = decode(&encode(&grey, ImageFormat::Png), 100).unwrap();
        assert_eq!(decoded.get_pixel(0, 0), &Rgb([77, 77, 77]));

        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(4, 4, Rgba([1, 2, 3, 0])));
        let decoded = decode(&encode(&rgba, ImageFormat::Png), 100).unwrap();
        assert_eq!(decoded.get_pixel(0, 0), &Rgb([1, 2, 3]));
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 4x2 JPEG tagged "rotate 90 clockwise" (orientation 6) must come out 2x4.
        let image = RgbImage::from_pixel(4, 2, Rgb([200, 10, 10]));
        let mut jpeg = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new(&mut jpeg);
        let exif = [
            b"MM\0\x2a\0\0\0\x08".as_slice(),
            &[0, 1],                                     // one IFD entry
            &[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0], // Orientation, SHORT, 1 value, 6
            &[0, 0, 0, 0],                               // no next IFD
        ]
        .concat();
        encoder.set_exif_metadata(exif).unwrap();
        encoder
            .write_image(image.as_raw(), 4, 2, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(decode(&jpeg, 100).unwrap().dimensions(), (2, 4));
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        let png = encode(&sample(), ImageFormat::Png);
        assert!(matches!(
            decode(&png, 127),
            Err(DecodeError::TooManyPixels { pixels: 128, .. })
        ));
    }

    #[test]
    fn garbage_is_not_an_image() {
        assert!(matches!(
            decode(b"hello, world", 100),
            Err(DecodeError::UnknownFormat)
        ));
        let mut png = encode(&sample(), ImageFormat::Png);
        png.truncate(60);
        assert!(matches!(decode(&png, 1000), Err(DecodeError::Corrupt(_))));
    }
}
