//! Turning a decoded RGB image into the model's input pixels (HWC, RGB, uint8).

use std::fmt;
use std::str::FromStr;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

/// How an image is fitted to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Recipe {
    /// Square centre crop of `fraction` of the short side, then bicubic resize (the training recipe of
    /// EfficientNet-Lite: fraction 224/256).
    CenterCrop {
        /// Side of the crop relative to the short side of the image, in (0, 1].
        fraction: f64,
    },
    /// Bicubic resize of the whole image, aspect ratio not kept.
    Resize,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe::CenterCrop {
            fraction: 224.0 / 256.0,
        }
    }
}

impl FromStr for Recipe {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "resize" => Ok(Recipe::Resize),
            "center-crop" => Ok(Recipe::default()),
            other => {
                let fraction = other
                    .strip_prefix("center-crop:")
                    .and_then(|f| f.parse::<f64>().ok())
                    .ok_or_else(|| format!("unknown recipe `{other}`: use `center-crop`, `center-crop:FRACTION` or `resize`"))?;
                if fraction > 0.0 && fraction <= 1.0 {
                    Ok(Recipe::CenterCrop { fraction })
                } else {
                    Err(format!("crop fraction must be in (0, 1], got {fraction}"))
                }
            }
        }
    }
}

impl fmt::Display for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recipe::CenterCrop { fraction } => write!(f, "center-crop:{fraction}"),
            Recipe::Resize => f.write_str("resize"),
        }
    }
}

/// A resize that should not fail for valid sizes did.
#[derive(Debug, thiserror::Error)]
#[error("resize failed: {0}")]
pub struct PreprocessError(String);

/// Applies `recipe` and returns `height * width * 3` bytes, row-major HWC RGB.
pub fn preprocess(
    image: &RgbImage,
    recipe: Recipe,
    height: u32,
    width: u32,
) -> Result<Vec<u8>, PreprocessError> {
    let (w, h) = image.dimensions();
    let cropped;
    let (src_w, src_h, src): (u32, u32, &[u8]) = match recipe {
        Recipe::Resize => (w, h, image.as_raw()),
        Recipe::CenterCrop { fraction } => {
            let short = w.min(h);
            // Truncation, not rounding: the recipe is Python's `int(224 / 256 * min(h, w))`.
            let side = ((f64::from(short) * fraction) as u32).clamp(1, short.max(1));
            let top = (h - side).div_ceil(2);
            let left = (w - side).div_ceil(2);
            // Copy the crop out rather than telling the resizer about it: the resizer would otherwise read
            // pixels beyond the crop edge for its filter support, while the reference clamps at the edge.
            cropped = crop(image, left, top, side, side);
            (side, side, cropped.as_slice())
        }
    };
    let src = ImageRef::new(src_w, src_h, src, PixelType::U8x3)
        .map_err(|e| PreprocessError(e.to_string()))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    // Catmull-Rom is the a = -0.5 cubic of Pillow's BICUBIC, with the same support scaling when shrinking.
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| PreprocessError(e.to_string()))?;
    Ok(dst.into_vec())
}

fn crop(image: &RgbImage, left: u32, top: u32, width: u32, height: u32) -> Vec<u8> {
    let stride = image.width() as usize * 3;
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for row in top..top + height {
        let start = row as usize * stride + left as usize * 3;
        out.extend_from_slice(&image.as_raw()[start..start + width as usize * 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_parse_and_print() {
        assert_eq!(
            "center-crop".parse::<Recipe>().unwrap(),
            Recipe::CenterCrop { fraction: 0.875 }
        );
        assert_eq!("resize".parse::<Recipe>().unwrap(), Recipe::Resize);
        assert_eq!(
            "center-crop:0.5".parse::<Recipe>().unwrap(),
            Recipe::CenterCrop { fraction: 0.5 }
        );
        assert!("center-crop:0".parse::<Recipe>().is_err());
        assert!("center-crop:1.5".parse::<Recipe>().is_err());
        assert!("blur".parse::<Recipe>().is_err());
        assert_eq!(Recipe::Resize.to_string(), "resize");
    }

    #[test]
    fn output_has_model_size() {
        let image = RgbImage::from_fn(640, 480, |x, y| image::Rgb([x as u8, y as u8, 7]));
        for recipe in [Recipe::default(), Recipe::Resize] {
            let pixels = preprocess(&image, recipe, 224, 200).unwrap();
            assert_eq!(pixels.len(), 224 * 200 * 3);
        }
    }

    #[test]
    fn centre_crop_uses_reference_offsets() {
        // A 10x6 image: crop side int(0.875 * 6) = 5 at top (6-5+1)//2 = 1, left (10-5+1)//2 = 3.
        let image = RgbImage::from_fn(10, 6, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let pixels = preprocess(&image, Recipe::default(), 5, 5).unwrap();
        assert_eq!(&pixels[..3], &[3, 1, 0]);
        let last = pixels.len() - 3;
        assert_eq!(&pixels[last..], &[7, 5, 0]);
    }

    #[test]
    fn tiny_images_do_not_panic() {
        let image = RgbImage::from_pixel(1, 1, image::Rgb([9, 8, 7]));
        let pixels = preprocess(&image, Recipe::default(), 4, 4).unwrap();
        assert!(pixels.chunks(3).all(|p| p == [9, 8, 7]));
    }
}
