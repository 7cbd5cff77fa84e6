//! Every kind of bad input is an error naming the file and the record, or, under the skip
//! policy, left out and counted. Nothing panics. Odd but valid images (a photo stored sideways)
//! load as viewers show them where asked to.

use glip_data::detection::{check_box, load_image, load_image_upright};
use glip_data::{CocoDataset, DataError, ErrorPolicy, OdvgDataset};
use image::{Rgb, RgbImage};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("glip-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn png(path: &Path, w: u32, h: u32) {
    image::RgbImage::new(w, h).save(path).unwrap();
}

const CATS: &str = r#"[{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]"#;
const IMGS: &str = r#"[{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]"#;

fn coco(dir: &Dir, anns: &str, imgs: &str, cats: &str) -> PathBuf {
    dir.write(
        "gt.json",
        &format!(r#"{{"images": {imgs}, "annotations": {anns}, "categories": {cats}}}"#),
    )
}

fn coco_err(anns: &str, imgs: &str, cats: &str) -> String {
    let d = Dir::new("coco");
    let p = coco(&d, anns, imgs, cats);
    CocoDataset::open(&p, &d.0, ErrorPolicy::Fail).unwrap_err().to_string()
}

fn ann(id: u32, img: u32, cat: u32, bbox: &str) -> String {
    format!(
        r#"{{"id": {id}, "image_id": {img}, "category_id": {cat}, "bbox": {bbox}, "iscrowd": 0}}"#
    )
}

#[test]
fn coco_record_errors_name_file_and_record() {
    let cases = [
        (format!("[{}]", ann(3, 1, 7, "[1, 2, 0, 5]")), IMGS.to_string(), CATS, "annotation id 3: box with zero or negative size"),
        (format!("[{}]", ann(3, 1, 7, "[1, 2, -4, 5]")), IMGS.into(), CATS, "annotation id 3: box with zero or negative size"),
        (format!("[{}]", ann(3, 1, 7, "[0, 2, 1e-300, 5]")), IMGS.into(), CATS, "annotation id 3: box with zero or negative size in f32"),
        (format!("[{}]", ann(4, 1, 7, "[100, 2, 10, 5]")), IMGS.into(), CATS, "annotation id 4: box far outside"),
        (format!("[{}]", ann(5, 1, 7, r#"[1, "NaN", 3, 4]"#)), IMGS.into(), CATS, "annotation id 5: box [1.0, NaN"),
        (format!("[{}]", ann(6, 1, 8, "[1, 2, 3, 4]")), IMGS.into(), CATS, "annotation id 6: unknown category id 8"),
        (format!("[{}]", ann(6, 2, 7, "[1, 2, 3, 4]")), IMGS.into(), CATS, "annotation id 6: unknown image id 2"),
        (format!("[{}, {}]", ann(6, 1, 7, "[1, 2, 3, 4]"), ann(6, 1, 9, "[1, 2, 3, 4]")), IMGS.into(), CATS, "annotation id 6: duplicate annotation id"),
        ("[]".into(), r#"[{"id": 1, "file_name": "a.png", "width": 4, "height": 3}, {"id": 1, "file_name": "b.png", "width": 4, "height": 3}]"#.into(), CATS, "image id 1: duplicate image id"),
        ("[]".into(), IMGS.into(), r#"[{"id": 7, "name": "cat"}, {"id": 7, "name": "dog"}]"#, "category id 7: duplicate category id"),
        ("[]".into(), IMGS.into(), r#"[{"id": 7, "name": "  "}]"#, "category id 7: empty category name"),
        (format!("[{}]", ann(3, 1, 7, "[1, 2, 3]")), IMGS.into(), CATS, "annotation id 3: bbox has 3 numbers"),
    ];
    for (anns, imgs, cats, want) in cases {
        let err = coco_err(&anns, &imgs, cats);
        assert!(err.contains("gt.json: ") && err.contains(want), "expected {want:?} in {err:?}");
    }
}

#[test]
fn malformed_json_names_the_file_and_line() {
    let d = Dir::new("malformed");
    let p = d.write("gt.json", "{\"images\": [\n  {\"id\": 1,, }\n]}");
    let err = CocoDataset::open(&p, &d.0, ErrorPolicy::Fail).unwrap_err();
    assert!(matches!(err, DataError::Json { line: Some(2), .. }), "{err}");
    assert!(err.to_string().contains("gt.json:2: malformed json"), "{err}");
}

#[test]
fn skip_policy_leaves_out_and_counts() {
    let d = Dir::new("skip");
    let anns = format!(
        "[{}, {}, {}]",
        ann(1, 1, 7, "[1, 2, 3, 4]"),
        ann(2, 1, 7, "[1, 2, 0, 4]"),
        ann(3, 1, 8, "[1, 2, 3, 4]")
    );
    let p = coco(&d, &anns, IMGS, CATS);
    let ds = CocoDataset::open(&p, &d.0, ErrorPolicy::Skip).unwrap();
    assert_eq!(ds.objects[0].len(), 1);
    assert_eq!(ds.report.problems.len(), 2);
    assert_eq!(
        ds.report.summary(),
        "2 record(s) skipped: 1 box with zero or negative size, 1 unknown category id 8"
    );
    // Under the default policy the same file fails, listing both problems.
    let err = CocoDataset::open(&p, &d.0, ErrorPolicy::Fail).unwrap_err().to_string();
    assert!(
        err.starts_with("2 problem(s) in")
            && err.contains("annotation id 2")
            && err.contains("annotation id 3"),
        "{err}"
    );
}

#[test]
fn missing_and_corrupt_images_are_named() {
    use glip_data::{rng::Rng, Dataset};
    let d = Dir::new("images");
    let imgs = r#"[{"id": 1, "file_name": "a.png", "width": 40, "height": 30}, {"id": 2, "file_name": "b.png", "width": 40, "height": 30}, {"id": 3, "file_name": "c.png", "width": 40, "height": 30}]"#;
    let p = coco(&d, "[]", imgs, CATS);
    png(&d.0.join("a.png"), 40, 30);
    d.write("b.png", "not a png at all");
    let ds = CocoDataset::open(&p, &d.0, ErrorPolicy::Fail).unwrap();
    let problems = ds.check_images();
    assert_eq!(problems.len(), 2);
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter().any(|t| t.contains("image id 2 (b.png)") && t.contains("cannot be decoded")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|t| t.contains("image id 3 (c.png)") && t.contains("cannot be read")),
        "{text:?}"
    );
    let err = ds.get(2, &mut Rng::new(0)).unwrap_err().to_string();
    assert!(err.contains("c.png: image cannot be read"), "{err}");
    // A crowd region is kept in the dataset but never becomes a training target.
    let anns = r#"[{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 1}, {"id": 2, "image_id": 1, "category_id": 9, "bbox": [10, 10, 5, 5], "iscrowd": 0}]"#;
    let p = coco(&d, anns, IMGS, CATS);
    let ds = CocoDataset::open(&p, &d.0, ErrorPolicy::Fail).unwrap();
    let s = ds.get(0, &mut Rng::new(0)).unwrap();
    assert_eq!(s.boxes, vec![[10.0, 10.0, 15.0, 15.0]]);
    assert_eq!(s.labels, vec![Some(1)]);
}

#[test]
fn odvg_errors_name_file_and_line() {
    let d = Dir::new("odvg");
    let lm = d.write("labels.json", r#"{"0": "cat", "1": "dog"}"#);
    let det = |bbox: &str, label: u32| {
        format!(
            r#"{{"filename": "a.png", "height": 30, "width": 40, "detection": {{"instances": [{{"bbox": {bbox}, "label": {label}}}]}}}}"#
        )
    };
    let gr = |spans: &str| {
        format!(
            r#"{{"filename": "a.png", "height": 30, "width": 40, "grounding": {{"caption": "a cat", "regions": [{{"bbox": [1, 1, 5, 5], "phrase": "cat", "tokens_positive": {spans}}}]}}}}"#
        )
    };
    let cases = [
        (
            format!("{}\n{}", det("[1, 1, 5, 5]", 0), det("[1, 1, 5, 5]", 4)),
            "line 2: instance 0: unknown category label 4",
        ),
        (det("[5, 1, 5, 5]", 0), "line 1: instance 0: box with zero or negative size"),
        (det("[0, 1, 1e-300, 5]", 0), "line 1: instance 0: box with zero or negative size in f32"),
        (
            gr("[[2, 9]]"),
            "line 1: region 0: span 0 = [2, 9) is empty or outside the caption of 5 characters",
        ),
        (gr("[]"), "line 1: region 0: no span"),
        (format!("{}\n{{\"filename\": ", det("[1, 1, 5, 5]", 0)), "odvg.jsonl:2: malformed json"),
        (
            r#"{"filename": "a.png", "height": 30, "width": 40}"#.to_string(),
            "line 1: record has neither",
        ),
    ];
    for (text, want) in cases {
        let p = d.write("odvg.jsonl", &text);
        let err =
            OdvgDataset::open(&p, &d.0, Some(&lm), ErrorPolicy::Fail).unwrap_err().to_string();
        assert!(err.contains("odvg.jsonl") && err.contains(want), "expected {want:?} in {err:?}");
    }
    let lm_bad = d.write("bad_labels.json", r#"{"0": ""}"#);
    let p = d.write("odvg.jsonl", &det("[1, 1, 5, 5]", 0));
    let err =
        OdvgDataset::open(&p, &d.0, Some(&lm_bad), ErrorPolicy::Fail).unwrap_err().to_string();
    assert!(err.contains("bad_labels.json: label 0: empty category name"), "{err}");
}

/// Words split at spaces, each its own token, `[CLS]` and `[SEP]` around them (empty offsets),
/// at most `budget` tokens: enough of a tokenizer to check captions against.
struct Words {
    budget: usize,
}

impl glip_core::prompt::CaptionTokenizer for Words {
    fn encode_caption(&self, caption: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>), String> {
        let mut offsets = vec![(0, 0)];
        let mut start = None;
        for (i, c) in caption.chars().chain([' ']).enumerate() {
            match (c == ' ', start) {
                (true, Some(s)) => {
                    offsets.push((s, i));
                    start = None;
                }
                (false, None) => start = Some(i),
                _ => {}
            }
        }
        offsets.push((0, 0));
        if offsets.len() > self.budget {
            return Err(format!("{} tokens, over the budget of {}", offsets.len(), self.budget));
        }
        Ok((vec![1; offsets.len()], offsets))
    }
    fn count_tokens(&self, caption: &str) -> Result<usize, String> {
        Ok(Words { budget: usize::MAX }.encode_caption(caption)?.0.len())
    }
    fn token_budget(&self) -> usize {
        self.budget
    }
}

#[test]
fn odvg_captions_are_checked_against_the_tokenizer() {
    let d = Dir::new("odvg-captions");
    let lm = d.write("labels.json", r#"{"0": "cat"}"#);
    let gr = |caption: &str, spans: &str| {
        format!(
            r#"{{"filename": "a.png", "height": 30, "width": 40, "grounding": {{"caption": "{caption}", "regions": [{{"bbox": [1, 1, 5, 5], "tokens_positive": {spans}}}]}}}}"#
        )
    };
    let det = r#"{"filename": "a.png", "height": 30, "width": 40, "detection": {"instances": [{"bbox": [1, 1, 5, 5], "label": 0}]}}"#;
    // Lines: 1 fine, 2 a phrase of the space between two words, 3 over a budget of 7 tokens (7
    // words), 4 a detection record (its prompts are made within the budget), 5 fine.
    let text = [
        gr("a black cat", "[[2, 11]]"),
        gr("a  cat", "[[1, 2]]"),
        gr("one two three four five six cat", "[[28, 31]]"),
        det.to_string(),
        gr("a dog and a cat", "[[2, 5], [12, 15]]"),
    ]
    .join("\n");
    let p = d.write("odvg.jsonl", &text);
    let open = || OdvgDataset::open(&p, &d.0, Some(&lm), ErrorPolicy::Fail).unwrap();
    let tok: std::sync::Arc<dyn glip_core::prompt::CaptionTokenizer> =
        std::sync::Arc::new(Words { budget: 7 });
    let with_tok = || open().with_prompts(Default::default(), Some(tok.clone()));

    // Without a tokenizer there is nothing to check against.
    assert_eq!(open().check_captions(ErrorPolicy::Fail).unwrap().records.len(), 5);
    let err = with_tok().check_captions(ErrorPolicy::Fail).unwrap_err().to_string();
    for want in [
        "odvg.jsonl",
        "line 2: phrase covers no token: region 0, \" \"",
        "line 3: caption not usable: 9 tokens, over the budget of 7",
    ] {
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }
    assert!(!err.contains("line 1") && !err.contains("line 4") && !err.contains("line 5"), "{err}");

    let ds = with_tok().check_captions(ErrorPolicy::Skip).unwrap();
    assert_eq!(ds.lines, vec![1, 4, 5]);
    assert_eq!(ds.record_kinds(), (1, 2));
    assert_eq!(ds.report.problems.len(), 2);
    assert!(ds.report.problems[1].record.contains("line 3"), "{:?}", ds.report);
    // The records kept are those lines' records.
    use glip_data::{rng::Rng, Dataset};
    png(&d.0.join("a.png"), 40, 30);
    let s = ds.get(2, &mut Rng::new(0)).unwrap();
    assert_eq!((s.caption.as_str(), s.phrases), ("a dog and a cat", vec![vec![(2, 5), (12, 15)]]));
}

#[test]
fn missing_image_files_are_found_before_training() {
    let d = Dir::new("missing-files");
    png(&d.0.join("a.png"), 40, 30);
    png(&d.0.join("c.png"), 40, 30);
    let imgs = r#"[{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
                   {"id": 3, "file_name": "c.png", "width": 40, "height": 30},
                   {"id": 4, "file_name": "d.png", "width": 40, "height": 30}]"#;
    let anns = r#"[{"id": 1, "image_id": 3, "category_id": 9, "bbox": [1, 1, 5, 5]}]"#;
    let gt = coco(&d, anns, imgs, CATS);
    let open = || CocoDataset::open(&gt, &d.0, ErrorPolicy::Fail).unwrap();
    let err = open().without_missing_files(ErrorPolicy::Fail).unwrap_err().to_string();
    for want in ["gt.json", "image id 2 (b.png): image file missing", "image id 4 (d.png)"] {
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }
    assert!(!err.contains("a.png") && !err.contains("c.png"), "{err}");
    let ds = open().without_missing_files(ErrorPolicy::Skip).unwrap();
    let ids: Vec<u64> = ds.images.iter().map(|im| im.id).collect();
    assert_eq!(ids, [1, 3]);
    // Each image keeps its own objects.
    assert_eq!(ds.objects.iter().map(Vec::len).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(ds.report.problems.len(), 2);

    let lm = d.write("labels.json", r#"{"0": "cat"}"#);
    let rec = |f: &str| {
        format!(
            r#"{{"filename": "{f}", "height": 30, "width": 40, "detection": {{"instances": [{{"bbox": [1, 1, 5, 5], "label": 0}}]}}}}"#
        )
    };
    let text = ["a.png", "b.png", "c.png"].map(rec).join("\n");
    let p = d.write("odvg.jsonl", &text);
    let open = || OdvgDataset::open(&p, &d.0, Some(&lm), ErrorPolicy::Fail).unwrap();
    let err = open().without_missing_files(ErrorPolicy::Fail).unwrap_err().to_string();
    assert!(err.contains("odvg.jsonl: line 2 (b.png): image file missing"), "{err}");
    let ds = open().without_missing_files(ErrorPolicy::Skip).unwrap();
    assert_eq!(ds.lines, [1, 3]);
    assert_eq!(ds.report.problems.len(), 1);
}

#[test]
fn odvg_detection_records_without_a_label_map_say_so() {
    let d = Dir::new("odvg-no-map");
    let p = d.write(
        "odvg.jsonl",
        r#"{"filename": "a.png", "height": 30, "width": 40, "detection": {"instances": [{"bbox": [1, 1, 5, 5], "label": 3}]}}"#,
    );
    let err = OdvgDataset::open(&p, &d.0, None, ErrorPolicy::Fail).unwrap_err().to_string();
    assert!(
        err.contains("odvg.jsonl: line 1: instance 0: category label 3 without a label map"),
        "{err}"
    );
}

/// A JPEG of `img`, with an EXIF block (APP1) holding only `orientation` where given: a
/// big-endian TIFF header and one IFD entry, Orientation (tag 0x0112, one SHORT).
fn jpeg(img: &RgbImage, orientation: Option<u16>) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95).encode_image(img).unwrap();
    let Some(o) = orientation else { return jpeg };
    let mut app1 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
    app1.extend(o.to_be_bytes());
    app1.extend([0; 6]); // the value's padding, then no next IFD
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend([0xFF, 0xE1]);
    out.extend(u16::try_from(app1.len() + 2).unwrap().to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

/// `load_image_upright` turns a photo as its EXIF orientation says (6: 90 degrees clockwise,
/// 8: 90 counter-clockwise, 3: 180), as viewers do; `load_image` keeps the stored pixels.
#[test]
fn a_photo_is_turned_upright_by_its_exif_orientation() {
    // 32 wide, 16 tall: the left half red, the right half blue.
    let stored =
        RgbImage::from_fn(32, 16, |x, _| Rgb(if x < 16 { [220, 30, 30] } else { [30, 30, 220] }));
    let dir = Dir::new("exif");
    let red = |img: &RgbImage, x: u32, y: u32| {
        let p = img.get_pixel(x, y);
        assert!(p[0].abs_diff(p[2]) > 100, "({x}, {y}) is {p:?}: neither red nor blue");
        p[0] > p[2]
    };
    // (EXIF orientation, upright size, a point in the red half, one in the blue half).
    let cases = [
        (None, (32, 16), (8, 8), (24, 8)),
        (Some(1), (32, 16), (8, 8), (24, 8)),
        (Some(6), (16, 32), (8, 8), (8, 24)),
        (Some(8), (16, 32), (8, 24), (8, 8)),
        (Some(3), (32, 16), (24, 8), (8, 8)),
    ];
    for (orientation, size, r, b) in cases {
        let path = dir.0.join(format!("photo-{orientation:?}.jpg"));
        std::fs::write(&path, jpeg(&stored, orientation)).unwrap();
        let (upright, applied) = load_image_upright(&path).unwrap();
        assert_eq!(applied, orientation.map_or(1, |o| o as u8), "{orientation:?}");
        assert_eq!(upright.dimensions(), size, "{orientation:?}");
        assert!(red(&upright, r.0, r.1) && !red(&upright, b.0, b.1), "{orientation:?}");
        let as_stored = load_image(&path).unwrap();
        assert_eq!(as_stored.dimensions(), (32, 16), "{orientation:?}");
        assert!(red(&as_stored, 8, 8) && !red(&as_stored, 24, 8), "{orientation:?}");
    }
}

/// A format glip does not read is named with the ones it does.
#[test]
fn an_unsupported_format_names_png_and_jpeg() {
    let dir = Dir::new("gif");
    let path = dir.0.join("image.gif");
    std::fs::write(&path, b"GIF89a\x01\0\x01\0\0\0\0;").unwrap();
    let err = load_image(&path).unwrap_err().to_string();
    assert!(err.contains("cannot be decoded") && err.contains("glip reads PNG and JPEG"), "{err}");
}

/// `caption_negatives`: a grounding record's caption gets phrases of the other captions and
/// names of the label map that it does not contain, after its own characters (so its regions'
/// spans still hold), as many as asked and as fit the token budget; none by default.
#[test]
fn caption_negatives_name_only_phrases_the_caption_lacks() {
    use glip_core::prompt::CaptionTokenizer;
    use glip_data::{rng::Rng, Dataset, PromptConfig};
    let d = Dir::new("caption-negatives");
    png(&d.0.join("a.png"), 40, 30);
    let lm = d.write("labels.json", r#"{"0": "bird"}"#);
    let gr = |caption: &str, spans: &str| {
        format!(
            r#"{{"filename": "a.png", "height": 30, "width": 40, "grounding": {{"caption": "{caption}", "regions": [{{"bbox": [1, 1, 5, 5], "tokens_positive": {spans}}}]}}}}"#
        )
    };
    let text = [
        gr("a black cat", "[[2, 11]]"),
        gr("a dog and a Cat", "[[2, 5], [12, 15]]"),
        gr("a red car.", "[[2, 9]]"),
    ]
    .join("\n");
    let p = d.write("odvg.jsonl", &text);
    let open = |n: usize, budget: usize| {
        let tok: std::sync::Arc<dyn glip_core::prompt::CaptionTokenizer> =
            std::sync::Arc::new(Words { budget });
        let prompt = PromptConfig { caption_negatives: n, ..Default::default() };
        OdvgDataset::open(&p, &d.0, Some(&lm), ErrorPolicy::Fail)
            .unwrap()
            .with_prompts(prompt, Some(tok))
    };
    // The phrases are "black cat", "dog cat" (a phrase of two spans: the caption does not
    // contain it as written, but it is its own), "red car" and "bird".
    // Each sample: the caption whole, before or after the negatives, its phrase's spans moved
    // with it; over seeds, both places.
    let ds = open(10, 1000);
    let mut places = [0, 0];
    for seed in 0..16 {
        let s = ds.get(1, &mut Rng::new(seed)).unwrap();
        let caption = "a dog and a Cat";
        let (negs, shift) = match s.caption.strip_prefix(caption) {
            Some(tail) => (tail.strip_prefix(". ").unwrap().strip_suffix('.').unwrap(), 0),
            None => {
                let head = s.caption.strip_suffix(caption).unwrap_or_else(|| panic!("{s:?}"));
                (head.strip_suffix(". ").unwrap(), head.chars().count())
            }
        };
        places[(shift > 0) as usize] += 1;
        let mut negs: Vec<&str> = negs.split(". ").collect();
        negs.sort_unstable();
        assert_eq!(negs, ["bird", "black cat", "red car"], "{s:?}");
        assert_eq!(s.phrases, vec![vec![(2 + shift, 5 + shift), (12 + shift, 15 + shift)]]);
        let chars: Vec<char> = s.caption.chars().collect();
        let text: String = chars[12 + shift..15 + shift].iter().collect();
        assert_eq!(text, "Cat");
    }
    assert!(places[0] > 0 && places[1] > 0, "{places:?}");
    // After a caption that ends a sentence already: a space, then the negatives.
    for seed in 0..8 {
        let s = ds.get(2, &mut Rng::new(seed)).unwrap();
        let after = s.caption.starts_with("a red car. ");
        assert!(after || s.caption.ends_with(". a red car."), "{s:?}");
    }
    // At most as many as asked, and within the budget: "a black cat" is 3 words + 2 specials.
    for seed in 0..4 {
        let s = open(1, 1000).get(0, &mut Rng::new(seed)).unwrap();
        assert_eq!(s.caption.matches(". ").count(), 1, "{s:?}");
    }
    for budget in [5, 6, 7, 9] {
        let s = open(10, budget).get(0, &mut Rng::new(3)).unwrap();
        let tokens = Words { budget: usize::MAX }.count_tokens(&s.caption).unwrap();
        assert!(tokens <= budget && s.caption.contains("a black cat"), "{budget}: {s:?}");
        // 5: no room; from 7 on, any one negative (two words at most) fits.
        match budget {
            5 => assert_eq!(s.caption, "a black cat"),
            7 | 9 => assert!(s.caption.len() > "a black cat".len(), "{budget}: {s:?}"),
            _ => {}
        }
    }
    // None by default: the caption as written.
    let s = open(0, 1000).get(1, &mut Rng::new(3)).unwrap();
    assert_eq!(s.caption, "a dog and a Cat");
}

/// `without_categories` (an open-vocabulary split): the held-out category's objects leave the
/// targets, its name every prompt (as a positive or a sampled negative), the other labels follow
/// their categories; a name the file lacks is an error listing its categories.
#[test]
fn held_out_categories_leave_targets_and_prompts() {
    use glip_data::{Dataset, PromptConfig};
    let d = Dir::new("held-out");
    png(&d.0.join("a.png"), 40, 30);
    let cats =
        r#"[{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 11, "name": "bird"}]"#;
    let anns = format!(
        "[{}, {}, {}]",
        ann(1, 1, 7, "[1, 2, 3, 4]"),
        ann(2, 1, 9, "[5, 6, 7, 8]"),
        ann(3, 1, 11, "[9, 10, 3, 4]")
    );
    let p = coco(&d, &anns, IMGS, cats);
    let open = || CocoDataset::open(&p, &d.0, ErrorPolicy::Fail).unwrap();
    let ds = open()
        .without_categories(&["dog".to_string()])
        .unwrap()
        .with_prompts(PromptConfig { max_negatives: 8, ..Default::default() }, None);
    assert_eq!(ds.categories(), ["cat", "bird"]);
    let kept: Vec<(usize, [f32; 4])> = ds.objects[0].iter().map(|o| (o.category, o.bbox)).collect();
    assert_eq!(kept, [(0, [1.0, 2.0, 4.0, 6.0]), (1, [9.0, 10.0, 12.0, 14.0])]);
    for seed in 0..20 {
        let mut rng = glip_core::rng::Rng::for_sample(seed, 0, 0);
        let s = ds.get(0, &mut rng).unwrap();
        assert!(!s.caption.contains("dog"), "{}", s.caption);
        assert!(s.caption.contains("cat") && s.caption.contains("bird"), "{}", s.caption);
        assert_eq!(s.boxes.len(), 2, "{}", s.caption);
    }
    let err = open().without_categories(&["horse".to_string()]).unwrap_err().to_string();
    assert!(err.contains("no category named \"horse\"") && err.contains("cat, dog, bird"), "{err}");
}

/// ODVG's `without_categories`: a detection record loses the held-out category's boxes and its
/// prompts its name (as a positive or a negative), the other labels follow their categories, a
/// grounding caption's negatives never name it; a name the label map lacks is an error listing
/// the label map's names, and `without_any_of` passes over it.
#[test]
fn odvg_held_out_categories_leave_boxes_prompts_and_caption_negatives() {
    use glip_data::{rng::Rng, Dataset, PromptConfig};
    let d = Dir::new("odvg-held-out");
    png(&d.0.join("a.png"), 40, 30);
    let lm = d.write("labels.json", r#"{"0": "cat", "1": "dog", "2": "bird"}"#);
    let inst = |label: u32, bbox: &str| format!(r#"{{"bbox": {bbox}, "label": {label}}}"#);
    let det = format!(
        r#"{{"filename": "a.png", "height": 30, "width": 40, "detection": {{"instances": [{}, {}, {}]}}}}"#,
        inst(0, "[1, 2, 4, 6]"),
        inst(1, "[5, 6, 7, 8]"),
        inst(2, "[9, 10, 12, 14]")
    );
    let gr = r#"{"filename": "a.png", "height": 30, "width": 40, "grounding": {"caption": "a red car", "regions": [{"bbox": [1, 1, 5, 5], "tokens_positive": [[2, 9]]}]}}"#;
    // A caption whose phrase is the held-out name: kept as written, never another's negative.
    let gr_dog = gr.replace("a red car", "a dog").replace("[[2, 9]]", "[[2, 5]]");
    let p = d.write("odvg.jsonl", &format!("{det}\n{gr}\n{gr_dog}"));
    let open = || OdvgDataset::open(&p, &d.0, Some(&lm), ErrorPolicy::Fail).unwrap();
    let prompt = PromptConfig { max_negatives: 8, caption_negatives: 8, ..Default::default() };
    let ds = open().without_categories(&["dog".to_string()]).unwrap().with_prompts(prompt, None);
    assert_eq!(ds.categories(), ["cat", "bird"]);
    for seed in 0..20 {
        let s = ds.get(0, &mut Rng::for_sample(seed, 0, 0)).unwrap();
        assert!(!s.caption.contains("dog"), "{}", s.caption);
        assert!(s.caption.contains("cat") && s.caption.contains("bird"), "{}", s.caption);
        let mut kept: Vec<(Option<u32>, [f32; 4])> =
            s.labels.iter().copied().zip(s.boxes.iter().copied()).collect();
        kept.sort_by_key(|k| k.0);
        assert_eq!(kept, [(Some(0), [1.0, 2.0, 4.0, 6.0]), (Some(1), [9.0, 10.0, 12.0, 14.0])]);
        let c = ds.get(1, &mut Rng::for_sample(seed, 0, 1)).unwrap();
        assert!(c.caption.contains("a red car") && !c.caption.contains("dog"), "{}", c.caption);
        assert!(c.caption.contains("cat"), "the other names are negatives: {}", c.caption);
    }
    assert!(ds.get(2, &mut Rng::new(0)).unwrap().caption.contains("a dog"));
    let err = open().without_categories(&["horse".to_string()]).unwrap_err().to_string();
    assert!(err.contains("no category named \"horse\"") && err.contains("cat, dog, bird"), "{err}");
    let ds = open().without_any_of(&["horse".to_string(), "cat".to_string()]);
    assert_eq!(ds.categories(), ["dog", "bird"]);
}

/// A coordinate as files give them: small integers, fractions, the edges of f32's integers
/// (2^24 and its neighbours), subnormal-small and huge values, zeros, NaN and infinities.
fn coordinate() -> impl Strategy<Value = f64> {
    prop_oneof![
        (-50i32..200).prop_map(f64::from),
        -50.0f64..200.0,
        prop::sample::select(vec![
            0.0,
            -0.0,
            1e-300,
            -1e-300,
            1e-40,
            16_777_215.0,
            16_777_216.0,
            16_777_217.0,
            16_777_218.0,
            4_294_967_295.0,
            1e30,
            -1e30,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ]),
    ]
}

proptest! {
    /// `check_box` (every COCO and ODVG box goes through it) accepts only what the rest of the
    /// pipeline can use: a box it returns is finite, of positive width and height in the f32 it
    /// is returned in, and inside the image. Any input either passes so or is refused with a
    /// message; none panics.
    #[test]
    fn a_checked_box_is_finite_positive_and_inside_its_image(
        x0 in coordinate(),
        y0 in coordinate(),
        x1 in coordinate(),
        y1 in coordinate(),
        w in prop_oneof![1u32..300, Just(16_777_217u32), Just(u32::MAX)],
        h in prop_oneof![1u32..300, Just(16_777_217u32), Just(u32::MAX)],
        as_size in any::<bool>(),
    ) {
        // COCO gives (x, y, width, height): the sum as coco.rs forms it.
        let b = if as_size { [x0, y0, x0 + x1, y0 + y1] } else { [x0, y0, x1, y1] };
        let (w, h) = (f64::from(w), f64::from(h));
        match check_box(b, w, h) {
            Ok(c) => {
                prop_assert!(c.iter().all(|v| v.is_finite()), "{b:?} -> {c:?}");
                prop_assert!(c[0] < c[2] && c[1] < c[3], "{b:?} -> {c:?}");
                prop_assert!(c[0] >= 0.0 && c[1] >= 0.0, "{b:?} -> {c:?}");
                prop_assert!(f64::from(c[2]) <= w.max(f64::from(w as f32)), "{b:?} -> {c:?}");
                prop_assert!(f64::from(c[3]) <= h.max(f64::from(h as f32)), "{b:?} -> {c:?}");
            }
            Err(why) => prop_assert!(why.contains("box"), "{b:?}: {why}"),
        }
    }
}
