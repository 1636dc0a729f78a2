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
    // Catmull-Rom is the a = -0.5 cubic of Pillow's BICUBIC, with the same support scaling when shrinking.
    resize((src_w, src_h, src), width, height, FilterType::CatmullRom)
}

/// `src` (width, height, RGB bytes) resized to `width` x `height` with the convolution `filter`.
fn resize(
    (src_w, src_h, src): (u32, u32, &[u8]),
    width: u32,
    height: u32,
    filter: FilterType,
) -> Result<Vec<u8>, PreprocessError> {
    let src = ImageRef::new(src_w, src_h, src, PixelType::U8x3)
        .map_err(|e| PreprocessError(e.to_string()))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| PreprocessError(e.to_string()))?;
    Ok(dst.into_vec())
}

/// Where a letterboxed image sits in the model's input: input pixels are `offset + scale * original`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    /// Input pixels per original pixel.
    pub scale: f64,
    /// Left edge of the image in the input.
    pub dx: u32,
    /// Top edge of the image in the input.
    pub dy: u32,
}

impl Letterbox {
    /// A box in input pixels (x1, y1, x2, y2) mapped back to the original image's pixels, clipped to its
    /// `width` x `height`.
    pub fn to_original(&self, bbox: [f32; 4], width: u32, height: u32) -> [f64; 4] {
        let x = |v: f32| {
            ((f64::from(v) - f64::from(self.dx)) / self.scale).clamp(0.0, f64::from(width))
        };
        let y = |v: f32| {
            ((f64::from(v) - f64::from(self.dy)) / self.scale).clamp(0.0, f64::from(height))
        };
        [x(bbox[0]), y(bbox[1]), x(bbox[2]), y(bbox[3])]
    }
}

/// The grey darknet's detectors were trained to see around a letterboxed image.
pub const LETTERBOX_FILL: u8 = 128;

/// Fits the whole image into `height` x `width` with its aspect ratio kept: scaled by
/// `s = min(width / w, height / h)` to `round(w * s)` x `round(h * s)` with a bilinear filter (Pillow's
/// BILINEAR, support scaled when shrinking), centred on a canvas of `fill` grey, offsets rounded down. Returns
/// `height * width * 3` bytes, row-major HWC RGB, and where the image landed.
pub fn letterbox(
    image: &RgbImage,
    height: u32,
    width: u32,
    fill: u8,
) -> Result<(Vec<u8>, Letterbox), PreprocessError> {
    let (w, h) = image.dimensions();
    let scale = (f64::from(width) / f64::from(w)).min(f64::from(height) / f64::from(h));
    // Python's round(), as the reference recipe uses it: halves to even.
    let fit = |side: u32, limit: u32| {
        ((f64::from(side) * scale).round_ties_even() as u32).clamp(1, limit)
    };
    let (nw, nh) = (fit(w, width), fit(h, height));
    let resized = resize((w, h, image.as_raw()), nw, nh, FilterType::Bilinear)?;
    let (dx, dy) = ((width - nw) / 2, (height - nh) / 2);
    let mut canvas = vec![fill; width as usize * height as usize * 3];
    let row_bytes = nw as usize * 3;
    for (row, line) in resized.chunks_exact(row_bytes).enumerate() {
        let start = ((dy as usize + row) * width as usize + dx as usize) * 3;
        canvas[start..start + row_bytes].copy_from_slice(line);
    }
    Ok((canvas, Letterbox { scale, dx, dy }))
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

    #[test]
    fn letterbox_centres_the_image_on_grey_and_maps_boxes_back() {
        // 400x300 into 416x416: s = 1.04, 416x312 at (0, 52).
        let image = RgbImage::from_pixel(400, 300, image::Rgb([10, 20, 30]));
        let (pixels, placed) = letterbox(&image, 416, 416, LETTERBOX_FILL).unwrap();
        assert_eq!(pixels.len(), 416 * 416 * 3);
        assert_eq!((placed.dx, placed.dy), (0, 52));
        assert!((placed.scale - 1.04).abs() < 1e-12);
        let at = |x: usize, y: usize| &pixels[(y * 416 + x) * 3..(y * 416 + x) * 3 + 3];
        assert_eq!(at(200, 51), [128, 128, 128]);
        assert_eq!(at(200, 52), [10, 20, 30]);
        assert_eq!(at(415, 363), [10, 20, 30]);
        assert_eq!(at(0, 364), [128, 128, 128]);
        let back = placed.to_original([0.0, 52.0, 104.0, 500.0], 400, 300);
        assert_eq!(back, [0.0, 0.0, 100.0, 300.0]);
    }

    #[test]
    fn letterbox_of_a_sliver_keeps_one_pixel() {
        let image = RgbImage::from_pixel(2000, 1, image::Rgb([1, 2, 3]));
        let (pixels, placed) = letterbox(&image, 416, 416, 0).unwrap();
        assert_eq!((placed.dx, placed.dy), (0, 207));
        assert_eq!(&pixels[(207 * 416) * 3..(207 * 416) * 3 + 3], [1, 2, 3]);
    }
}
