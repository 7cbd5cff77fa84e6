//! Matching and loss terms against the reference fixtures (`reference/make_fixtures.py`: scipy's
//! `linear_sum_assignment`, `torchvision.ops.box_iou` / `generalized_box_iou` /
//! `sigmoid_focal_loss`).

use candle_core::{Device, Result, Tensor, Var};
use glip_core::boxes::{box_iou, generalized_box_iou};
use glip_loss::matcher::hungarian;
use glip_loss::terms::sigmoid_focal;
use glip_testing::{assert_close, assert_forward_close, fixture, load};

#[test]
fn hungarian_reaches_scipys_optimal_total_on_every_case() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("matcher_cases.json")).unwrap())
            .unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let (rows, cols) =
            (case["rows"].as_u64().unwrap() as usize, case["cols"].as_u64().unwrap() as usize);
        let cost: Vec<f64> = case["cost"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        let m = hungarian(&cost, rows, cols).unwrap();
        assert_eq!(m.query.len(), rows.min(cols), "{rows}x{cols}: pairs");
        // A valid assignment: distinct rows and columns, sorted by row.
        assert!(m.query.windows(2).all(|w| w[0] < w[1]));
        let mut t = m.target.clone();
        t.sort_unstable();
        t.dedup();
        assert_eq!(t.len(), m.target.len());
        let total: f64 = m.query.iter().zip(&m.target).map(|(&q, &t)| cost[q * cols + t]).sum();
        let want = case["optimal_total"].as_f64().unwrap();
        assert!(
            (total - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{rows}x{cols}: total {total} vs scipy {want}"
        );
    }
}

#[test]
fn iou_and_giou_match_torchvision() -> Result<()> {
    let io = load("boxes_losses.safetensors", &glip_testing::device())?;
    assert_forward_close("iou", &box_iou(&io["a_xyxy"], &io["b_xyxy"])?, &io["iou"])?;
    assert_forward_close("giou", &generalized_box_iou(&io["a_xyxy"], &io["b_xyxy"])?, &io["giou"])?;
    Ok(())
}

#[test]
fn focal_loss_matches_torchvision_and_stays_finite_at_logits_of_100() -> Result<()> {
    let io = load("boxes_losses.safetensors", &glip_testing::device())?;
    let x = Var::from_tensor(&io["focal_logits"])?;
    let loss = sigmoid_focal(x.as_tensor(), &io["focal_targets"], 0.25, 2.0)?;
    assert_forward_close("focal_loss", &loss, &io["focal_loss"])?;
    let g = loss.sum_all()?.backward()?;
    let gx: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1()?;
    assert!(gx.iter().all(|v| v.is_finite()), "non-finite focal gradient");
    // The analytic gradient is bounded by max(alpha, 1 - alpha) * (1 + gamma) in magnitude.
    assert!(gx.iter().all(|v| v.abs() <= 0.75 * 3.0));
    // Saturated logits: zero loss when right, ~|x| * alpha_t when wrong.
    let sat = Tensor::new(&[100f32, -100.0, 100.0, -100.0], &Device::Cpu)?;
    let z = Tensor::new(&[1f32, 0.0, 0.0, 1.0], &Device::Cpu)?;
    let l: Vec<f32> = sigmoid_focal(&sat, &z, 0.25, 2.0)?.to_vec1()?;
    assert_close(
        "saturated",
        &Tensor::new(l, &Device::Cpu)?,
        &Tensor::new(&[0f32, 0.0, 75.0, 25.0], &Device::Cpu)?,
        1e-4,
        1e-3,
    )?;
    Ok(())
}
