//! From a detector's decoded rows to its answer: the best class of each box, a score threshold, per-class
//! greedy non-maximum suppression, and the highest-scoring boxes first.

/// What a request may set of the selection, with Triton's EfficientNMS names and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Selection {
    /// Lowest score kept.
    pub score_threshold: f32,
    /// A box overlapping a kept box of its class by this much or more (intersection over union) is dropped.
    pub iou_threshold: f32,
    /// Most boxes answered per image.
    pub max_detections: usize,
}

impl Default for Selection {
    fn default() -> Self {
        Self {
            score_threshold: 0.25,
            iou_threshold: 0.45,
            max_detections: 100,
        }
    }
}

/// One box found in an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub class: usize,
    pub score: f32,
    /// x1, y1, x2, y2 in input pixels, inside the input.
    pub bbox: [f32; 4],
}

/// Selects the detections of one image from its rows: `values` floats each, cx, cy, w, h as fractions of the
/// input (`width` x `height` pixels), objectness, then one score per class already weighted by objectness.
pub fn select(
    rows: &[f32],
    values: usize,
    width: f32,
    height: f32,
    selection: &Selection,
) -> Vec<Detection> {
    let mut candidates: Vec<Detection> = rows
        .chunks_exact(values)
        .filter_map(|row| {
            let (class, &score) = row[5..]
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))?;
            // A broken output yields no boxes rather than garbage.
            if score.is_nan() || score < selection.score_threshold {
                return None;
            }
            let (cx, cy, w, h) = (
                row[0] * width,
                row[1] * height,
                row[2] * width,
                row[3] * height,
            );
            Some(Detection {
                class,
                score,
                bbox: [
                    (cx - w / 2.0).clamp(0.0, width),
                    (cy - h / 2.0).clamp(0.0, height),
                    (cx + w / 2.0).clamp(0.0, width),
                    (cy + h / 2.0).clamp(0.0, height),
                ],
            })
        })
        .collect();
    // Highest score first; equal scores keep their row order, so the answer does not depend on the sort.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for candidate in candidates {
        if kept.len() == selection.max_detections {
            break;
        }
        let overlaps = kept.iter().any(|k| {
            k.class == candidate.class && iou(&k.bbox, &candidate.bbox) >= selection.iou_threshold
        });
        if !overlaps {
            kept.push(candidate);
        }
    }
    kept
}

/// Intersection over union of two boxes; 0 when both are empty.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let intersection = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection;
    if union > 0.0 {
        intersection / union
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of a 100x100 input with two classes: a box centred at (cx, cy) pixels, `size` wide and high.
    fn row(cx: f32, cy: f32, size: f32, scores: [f32; 2]) -> Vec<f32> {
        let mut r = vec![cx / 100.0, cy / 100.0, size / 100.0, size / 100.0, 1.0];
        r.extend(scores);
        r
    }

    fn run(rows: &[Vec<f32>], selection: &Selection) -> Vec<Detection> {
        select(&rows.concat(), 7, 100.0, 100.0, selection)
    }

    #[test]
    fn iou_of_boxes() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(iou(&a, &a), 1.0);
        assert_eq!(iou(&a, &[5.0, 0.0, 15.0, 10.0]), 50.0 / 150.0);
        assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
        assert_eq!(iou(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]), 0.0);
    }

    #[test]
    fn keeps_the_best_of_overlapping_boxes_of_one_class_and_every_class_apart() {
        let rows = [
            row(50.0, 50.0, 20.0, [0.6, 0.1]),
            row(51.0, 50.0, 20.0, [0.9, 0.1]),
            // Same place, another class: not suppressed.
            row(50.0, 50.0, 20.0, [0.1, 0.5]),
            // Same class, far away.
            row(10.0, 10.0, 10.0, [0.4, 0.0]),
            // Below the threshold.
            row(80.0, 80.0, 10.0, [0.2, 0.1]),
        ];
        let found = run(&rows, &Selection::default());
        let summary: Vec<(usize, f32)> = found.iter().map(|d| (d.class, d.score)).collect();
        assert_eq!(summary, [(0, 0.9), (1, 0.5), (0, 0.4)]);
        assert_eq!(found[0].bbox, [41.0, 40.0, 61.0, 60.0]);
    }

    #[test]
    fn thresholds_and_the_limit_come_from_the_selection() {
        let rows = [
            row(50.0, 50.0, 20.0, [0.9, 0.0]),
            row(55.0, 50.0, 20.0, [0.8, 0.0]),
            row(10.0, 10.0, 10.0, [0.3, 0.0]),
        ];
        // IoU of the first two is 15x20 / (2 x 400 - 300) = 0.6.
        let loose = Selection {
            iou_threshold: 0.7,
            ..Selection::default()
        };
        assert_eq!(run(&rows, &loose).len(), 3);
        let strict = Selection {
            score_threshold: 0.5,
            ..Selection::default()
        };
        assert_eq!(run(&rows, &strict).len(), 1);
        let one = Selection {
            max_detections: 1,
            iou_threshold: 0.7,
            ..Selection::default()
        };
        assert_eq!(run(&rows, &one)[0].score, 0.9);
    }

    #[test]
    fn boxes_are_clipped_to_the_input_and_nan_scores_are_dropped() {
        let rows = [
            row(5.0, 95.0, 20.0, [0.9, 0.0]),
            row(50.0, 50.0, 10.0, [f32::NAN, f32::NAN]),
        ];
        let found = run(&rows, &Selection::default());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].bbox, [0.0, 85.0, 15.0, 100.0]);
    }
}
