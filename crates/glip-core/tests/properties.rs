//! Property tests of the shape contracts and the box utilities.

use candle_core::{Device, Tensor};
use glip_core::boxes::{
    box_iou, cxcywh_to_xyxy, generalized_box_iou, paired_generalized_box_iou, xyxy_to_cxcywh,
};
use glip_core::shape::{Axis, Contract, ShapeError, Spec};
use proptest::prelude::*;

const NAMES: [&str; 5] = ["b", "q", "t", "d", "h"];

/// Random specs over a few axis names and fixed sizes, with one size per name.
fn specs_and_sizes() -> impl Strategy<Value = (Vec<Vec<Axis>>, [usize; 5])> {
    let axis = prop_oneof![
        (0..NAMES.len()).prop_map(|i| Axis::Named(NAMES[i].to_string())),
        (1usize..9).prop_map(Axis::Fixed),
        Just(Axis::Any),
    ];
    (
        prop::collection::vec(prop::collection::vec(axis, 0..5), 1..6),
        prop::array::uniform5(1usize..50),
    )
}

fn size_of(a: &Axis, sizes: &[usize; 5], any: usize) -> usize {
    match a {
        Axis::Named(n) => sizes[NAMES.iter().position(|x| x == n).unwrap()],
        Axis::Fixed(n) => *n,
        Axis::Any => any,
    }
}

fn spec_str(axes: &[Axis]) -> String {
    Spec(axes.to_vec()).to_string()
}

proptest! {
    #[test]
    fn contract_accepts_consistent_shapes((specs, sizes) in specs_and_sizes(), any in 1usize..100) {
        let mut c = Contract::new();
        for (i, spec) in specs.iter().enumerate() {
            let dims: Vec<usize> = spec.iter().map(|a| size_of(a, &sizes, any + i)).collect();
            let r = c.check(&format!("t{i}"), &dims, &spec_str(spec));
            prop_assert!(r.is_ok(), "{:?}", r);
        }
    }

    #[test]
    fn contract_rejects_a_changed_named_axis(
        (specs, sizes) in specs_and_sizes(), pick in any::<prop::sample::Index>(), delta in 1usize..7,
    ) {
        // Every occurrence of a named axis, as (tensor, position, name).
        let occ: Vec<(usize, usize, String)> = specs.iter().enumerate().flat_map(|(i, s)| {
            s.iter().enumerate().filter_map(move |(k, a)| match a {
                Axis::Named(n) => Some((i, k, n.clone())),
                _ => None,
            })
        }).collect();
        // Only names that occur at least twice can be inconsistent.
        let repeated: Vec<_> = occ.iter().filter(|(_, _, n)| occ.iter().filter(|o| &o.2 == n).count() > 1).collect();
        prop_assume!(!repeated.is_empty());
        let (ti, tk, name) = repeated[pick.index(repeated.len())].clone();
        let mut c = Contract::new();
        let mut failure: Option<ShapeError> = None;
        for (i, spec) in specs.iter().enumerate() {
            let mut dims: Vec<usize> = spec.iter().map(|a| size_of(a, &sizes, 3)).collect();
            if i == ti { dims[tk] += delta; }
            if let Err(e) = c.check(&format!("t{i}"), &dims, &spec_str(spec)) {
                failure = Some(e);
                break;
            }
        }
        let e = failure.expect("an inconsistent shape was accepted");
        prop_assert_eq!(e.axis(), Some(name.clone()));
        prop_assert!(e.to_string().contains(&format!("axis {name} = ")), "{}", e);
    }

    #[test]
    fn contract_rejects_a_changed_fixed_axis(n in 1usize..10, delta in 1usize..5, b in 1usize..5) {
        let err = Contract::new().check("x", &[b, n + delta], &format!("b {n}")).unwrap_err();
        prop_assert_eq!(err.axis(), Some("#1".to_string()));
    }

    #[test]
    fn contract_rejects_wrong_rank(dims in prop::collection::vec(1usize..5, 0..5)) {
        let spec = "a b c";
        let r = Contract::new().check("x", &dims, spec);
        prop_assert_eq!(r.is_ok(), dims.len() == 3);
    }
}

fn boxes_cxcywh() -> impl Strategy<Value = Vec<[f32; 4]>> {
    prop::collection::vec(
        (0.05f32..0.95, 0.05f32..0.95, 0.01f32..0.9, 0.01f32..0.9)
            .prop_map(|(a, b, c, d)| [a, b, c, d]),
        1..12,
    )
}

fn tensor(b: &[[f32; 4]]) -> Tensor {
    let flat: Vec<f32> = b.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (b.len(), 4), &Device::Cpu).unwrap()
}

proptest! {
    #[test]
    fn box_conversions_round_trip(b in boxes_cxcywh()) {
        let t = tensor(&b);
        let back = xyxy_to_cxcywh(&cxcywh_to_xyxy(&t).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (x, y) in b.iter().zip(&back) {
            for k in 0..4 { prop_assert!((x[k] - y[k]).abs() < 1e-5, "{x:?} vs {y:?}"); }
        }
    }

    #[test]
    fn iou_and_giou_bounds_and_symmetry(a in boxes_cxcywh(), b in boxes_cxcywh()) {
        let (ta, tb) = (cxcywh_to_xyxy(&tensor(&a)).unwrap(), cxcywh_to_xyxy(&tensor(&b)).unwrap());
        let iou = box_iou(&ta, &tb).unwrap().to_vec2::<f32>().unwrap();
        let giou = generalized_box_iou(&ta, &tb).unwrap().to_vec2::<f32>().unwrap();
        let giou_t = generalized_box_iou(&tb, &ta).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..a.len() {
            for j in 0..b.len() {
                prop_assert!((-1e-6..=1.0 + 1e-6).contains(&iou[i][j]), "iou {}", iou[i][j]);
                prop_assert!((-1.0 - 1e-6..=1.0 + 1e-6).contains(&giou[i][j]), "giou {}", giou[i][j]);
                prop_assert!(giou[i][j] <= iou[i][j] + 1e-6);
                prop_assert!((giou[i][j] - giou_t[j][i]).abs() < 1e-6);
            }
        }
        let self_iou = box_iou(&ta, &ta).unwrap().to_vec2::<f32>().unwrap();
        let self_giou = paired_generalized_box_iou(&ta, &ta).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..a.len() {
            prop_assert!((self_iou[i][i] - 1.0).abs() < 1e-5);
            prop_assert!((self_giou[i] - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn paired_giou_is_the_diagonal(a in boxes_cxcywh(), b in boxes_cxcywh()) {
        let n = a.len().min(b.len());
        let (ta, tb) = (cxcywh_to_xyxy(&tensor(&a[..n])).unwrap(), cxcywh_to_xyxy(&tensor(&b[..n])).unwrap());
        let full = generalized_box_iou(&ta, &tb).unwrap().to_vec2::<f32>().unwrap();
        let diag = paired_generalized_box_iou(&ta, &tb).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..n { prop_assert!((full[i][i] - diag[i]).abs() < 1e-6); }
    }
}

#[test]
fn error_message_names_tensor_axis_binding_and_shape() {
    let mut c = Contract::new();
    c.bind("q", 100, "queries").unwrap();
    c.check("images", &[2, 3, 8, 8], "b 3 h w").unwrap();
    let e = c.check("pred_boxes", &[2, 90, 4], "b q 4").unwrap_err();
    assert_eq!(
        e.to_string(),
        "pred_boxes: axis q = 90, expected 100 (bound by queries) in shape [2, 90, 4]"
    );
    let e = c.check("pred_logits", &[3, 100, 6], "b q _").unwrap_err();
    assert_eq!(
        e.to_string(),
        "pred_logits: axis b = 3, expected 2 (bound by images) in shape [3, 100, 6]"
    );
}

/// A phrase (no brackets, something besides spaces) and the text around it.
fn marked_parts() -> impl Strategy<Value = Vec<(String, String)>> {
    let text = "[a-zé ,.]{0,8}";
    let phrase = "[a-zé ]{0,3}[a-zé][a-zé ]{0,3}";
    prop::collection::vec((text, phrase), 1..5)
}

proptest! {
    /// `Prompt::marked` drops the brackets and each span selects its phrase's text, in
    /// characters (multi-byte ones included).
    #[test]
    fn marked_captions_give_each_phrase_its_span(parts in marked_parts(), tail in "[a-z .]{0,6}") {
        let marked: String =
            parts.iter().map(|(t, p)| format!("{t}[{p}]")).collect::<String>() + &tail;
        let prompt = glip_core::prompt::Prompt::marked(&marked).unwrap();
        let caption: String = parts.iter().map(|(t, p)| format!("{t}{p}")).collect::<String>() + &tail;
        prop_assert_eq!(&prompt.caption, &caption);
        let phrases: Vec<String> = parts.iter().map(|(_, p)| p.clone()).collect();
        prop_assert_eq!(prompt.phrases(), phrases);
    }
}

/// Wrong markings are errors naming the problem and where, never a panic.
#[test]
fn wrong_markings_are_errors_naming_where() {
    use glip_core::prompt::Prompt;
    for (text, problem, at) in [
        ("a [dog", "'[' not closed", 2),
        ("a dog]", "']' without '['", 5),
        ("a [big [dog]]", "'[' inside a phrase", 7),
        ("a [ ] dog", "empty phrase", 2),
        ("a dog", "no phrase marked", 0),
        ("", "no phrase marked", 0),
    ] {
        let e = Prompt::marked(text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{problem} at character {at} of")), "{text:?}: {e}");
    }
    // A hand-made prompt with a span past its caption: an empty phrase, not a panic.
    let p = Prompt { caption: "a dog".into(), spans: vec![(2, 5), (3, 9), (4, 2)] };
    assert_eq!(p.phrases(), ["dog", "", ""]);
}
