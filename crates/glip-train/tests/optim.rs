//! AdamW against `torch.optim.AdamW`'s update written out in f64, decay groups, schedules,
//! clipping, and state that resumes exactly.

use candle_core::{Device, Result, Tensor, Var};
use glip_train::optim::{AdamW, OptimConfig, Schedule};

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// loss = sum(c * w) + 0.5 * sum(w^2): gradient c + w.
fn grads(ws: &[&Var], cs: &[Vec<f32>]) -> Result<candle_core::backprop::GradStore> {
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    for (w, c) in ws.iter().zip(cs) {
        let c = Tensor::from_slice(c, w.as_tensor().dims(), &Device::Cpu)?;
        loss =
            (loss + ((w.as_tensor() * c)?.sum_all()? + (w.as_tensor().sqr()?.sum_all()? * 0.5)?)?)?;
    }
    loss.backward()
}

#[test]
fn adamw_matches_the_torch_update_and_skips_decay_on_vectors() -> Result<()> {
    let cfg = OptimConfig { lr: 0.01, weight_decay: 0.1, clip_norm: 0.0, ..Default::default() };
    let mat = var(&[0.5, -1.0, 2.0, 0.25], &[2, 2]);
    let bias = var(&[0.3, -0.7], &[2]);
    let mut opt = AdamW::new(
        vec![("head.weight".into(), mat.clone()), ("head.bias".into(), bias.clone())],
        cfg.clone(),
    )?;
    assert_eq!((opt.decays("head.weight"), opt.decays("head.bias")), (Some(true), Some(false)));
    let cs = vec![vec![1.0f32, -2.0, 0.5, 3.0], vec![-1.0f32, 0.25]];
    // Reference in f64 (torch.optim.AdamW's formulas).
    let mut refw: Vec<Vec<f64>> = vec![vec![0.5, -1.0, 2.0, 0.25], vec![0.3, -0.7]];
    let mut m = vec![vec![0f64; 4], vec![0f64; 2]];
    let mut v = m.clone();
    for t in 1..=3 {
        let g = grads(&[&mat, &bias], &cs)?;
        opt.step(&g)?;
        for k in 0..2 {
            for i in 0..refw[k].len() {
                let grad = cs[k][i] as f64 + refw[k][i];
                if k == 0 {
                    refw[k][i] *= 1.0 - 0.01 * 0.1;
                }
                m[k][i] = 0.9 * m[k][i] + 0.1 * grad;
                v[k][i] = 0.999 * v[k][i] + 0.001 * grad * grad;
                let mh = m[k][i] / (1.0 - 0.9f64.powi(t));
                let vh = v[k][i] / (1.0 - 0.999f64.powi(t));
                refw[k][i] -= 0.01 * mh / (vh.sqrt() + 1e-8);
            }
        }
    }
    for (k, w) in [&mat, &bias].iter().enumerate() {
        let got: Vec<f32> = w.as_tensor().flatten_all()?.to_vec1()?;
        for (a, b) in got.iter().zip(&refw[k]) {
            assert!((*a as f64 - b).abs() < 1e-6, "{got:?} vs {:?}", refw[k]);
        }
    }
    Ok(())
}

#[test]
fn groups_take_their_own_rates() -> Result<()> {
    let cfg = OptimConfig {
        lr: 1e-2,
        backbone_lr: 1e-3,
        text_lr: 0.0,
        weight_decay: 0.0,
        clip_norm: 0.0,
        ..Default::default()
    };
    let (a, b, c) = (var(&[1.0], &[1]), var(&[1.0], &[1]), var(&[1.0], &[1]));
    let mut opt = AdamW::new(
        vec![
            ("backbone.x".into(), a.clone()),
            ("text.x".into(), b.clone()),
            ("head.x".into(), c.clone()),
        ],
        cfg,
    )?;
    opt.step(&grads(&[&a, &b, &c], &[vec![1.0], vec![1.0], vec![1.0]])?)?;
    // First Adam step moves by lr (m/sqrt(v) = sign(g)).
    let moved = |v: &Var| 1.0 - v.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!(
        (moved(&a) - 1e-3).abs() < 1e-6
            && moved(&b).abs() < 1e-9
            && (moved(&c) - 1e-2).abs() < 1e-6
    );
    Ok(())
}

#[test]
fn warmup_then_step_multistep_or_cosine() {
    let mut cfg = OptimConfig {
        warmup_steps: 10,
        schedule: Schedule::Step { every: 100, gamma: 0.1 },
        ..Default::default()
    };
    assert!((cfg.lr_factor(5) - 0.5).abs() < 1e-12);
    assert_eq!(cfg.lr_factor(10), 1.0);
    assert_eq!(cfg.lr_factor(109), 1.0);
    assert!((cfg.lr_factor(110) - 0.1).abs() < 1e-12);
    // Milestones count from the start, warm-up included: the steps after 50 at gamma, after
    // 80 at gamma^2 (as maskrcnn-benchmark's WarmupMultiStepLR); parsed as a config writes it.
    cfg.schedule =
        toml::from_str::<OptimConfig>("schedule = { type = \"multistep\", milestones = [50, 80] }")
            .unwrap()
            .schedule;
    assert_eq!(cfg.schedule, Schedule::MultiStep { milestones: vec![50, 80], gamma: 0.1 });
    assert_eq!(cfg.lr_factor(50), 1.0);
    assert!((cfg.lr_factor(51) - 0.1).abs() < 1e-12);
    assert!((cfg.lr_factor(80) - 0.1).abs() < 1e-12);
    assert!((cfg.lr_factor(81) - 0.01).abs() < 1e-12);
    assert!((cfg.lr_factor(5) - 0.5).abs() < 1e-12, "warm-up first");
    cfg.schedule = Schedule::Cosine { total: 100, min_ratio: 0.1 };
    assert!((cfg.lr_factor(60) - (0.1 + 0.9 * 0.5)).abs() < 1e-12);
    assert!((cfg.lr_factor(110) - 0.1).abs() < 1e-12);
}

#[test]
fn clipping_scales_the_gradient_to_the_norm() -> Result<()> {
    let cfg = OptimConfig { clip_norm: 0.5, weight_decay: 0.0, ..Default::default() };
    let w = var(&[0.0, 0.0], &[2]);
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
    // Gradient (3, 4) + w = (3, 4): norm 5.
    let stats = opt.step(&grads(&[&w], &[vec![3.0, 4.0]])?)?;
    assert!((stats.grad_norm - 5.0).abs() < 1e-6);
    let (state, _) = opt.state()?;
    // m = (1 - beta1) * g * (0.5 / 5)
    let m: Vec<f32> = state["m.w"].to_vec1()?;
    assert!((m[0] - 0.1 * 0.3).abs() < 1e-6 && (m[1] - 0.1 * 0.4).abs() < 1e-6, "{m:?}");
    Ok(())
}

#[test]
fn restored_state_continues_exactly() -> Result<()> {
    let cfg = OptimConfig { ema_decay: Some(0.9), ..Default::default() };
    let cs = vec![vec![1.0f32, -2.0, 0.5]];
    let run = |steps_before: usize, steps_after: usize| -> Result<Vec<f32>> {
        let w = var(&[0.1, 0.2, 0.3], &[3]);
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg.clone())?;
        for _ in 0..steps_before {
            opt.step(&grads(&[&w], &cs)?)?;
        }
        let (state, step) = opt.state()?;
        let w2 = Var::from_tensor(&w.as_tensor().copy()?)?;
        let mut opt2 = AdamW::new(vec![("w".into(), w2.clone())], cfg.clone())?;
        opt2.load_state(&state, step, &Device::Cpu)?;
        for _ in 0..steps_after {
            opt2.step(&grads(&[&w2], &cs)?)?;
        }
        let mut out = w2.as_tensor().to_vec1::<f32>()?;
        out.extend(opt2.ema()?["w"].to_vec1::<f32>()?);
        Ok(out)
    };
    assert_eq!(run(2, 3)?[..3], run(5, 0)?[..3]);
    Ok(())
}

/// Adam's moments and the EMA are made at a parameter's first gradient: one that never has a
/// gradient (a frozen one) costs none and has none in the state; the EMA starts from the
/// weights before that first update (decay 1/2: `(w0 + w1) / 2`, exact); the state of a later
/// step restores; half a pair of moments is an error naming the missing one.
#[test]
fn moments_exist_only_for_parameters_with_gradients() -> Result<()> {
    let (w, frozen) = (var(&[0.1, 0.2, 0.3], &[3]), var(&[1.0, 2.0], &[2]));
    let params = || vec![("w".to_string(), w.clone()), ("frozen".to_string(), frozen.clone())];
    let cfg = OptimConfig { ema_decay: Some(0.5), ..Default::default() };
    let mut opt = AdamW::new(params(), cfg.clone())?;
    assert!(opt.state()?.0.is_empty(), "no moments before a gradient");
    let w0 = w.as_tensor().to_vec1::<f32>()?;
    opt.step(&grads(&[&w], &[vec![1.0, -2.0, 0.5]])?)?;
    let w1 = w.as_tensor().to_vec1::<f32>()?;
    assert_ne!(w0, w1);
    let want: Vec<f32> = w0.iter().zip(&w1).map(|(a, b)| 0.5 * a + 0.5 * b).collect();
    let ema = opt.ema()?;
    assert_eq!(ema.len(), 1);
    let got = ema["w"].to_vec1::<f32>()?;
    for (g, x) in got.iter().zip(&want) {
        // ema_update computes `d e + (1 - d) w` in f32: each product exact (halving), one
        // rounding of the sum, which is also what `want` rounds: equal.
        assert_eq!(g, x, "EMA {got:?}, want {want:?}");
    }
    let (state, step) = opt.state()?;
    let mut keys: Vec<&String> = state.keys().collect();
    keys.sort();
    assert_eq!(keys, ["ema.w", "m.w", "v.w"]);
    assert_eq!(frozen.as_tensor().to_vec1::<f32>()?, [1.0, 2.0]);
    let mut again = AdamW::new(params(), cfg)?;
    again.load_state(&state, step, &Device::Cpu)?;
    assert_eq!(again.state()?.0.len(), 3);
    let mut half = state.clone();
    half.remove("v.w");
    let err = again.load_state(&half, step, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("has m.w but no v.w"), "{err}");
    Ok(())
}

/// A run that turns the EMA on when resuming from a checkpoint without one starts the average
/// from the resumed weights at their first update, not from the values the parameters had
/// before the checkpoint was loaded.
#[test]
fn an_ema_begun_on_resume_starts_from_the_resumed_weights() -> Result<()> {
    let w = var(&[9.0, 9.0, 9.0], &[3]);
    let cfg = OptimConfig { ema_decay: Some(0.5), ..Default::default() };
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
    // The checkpoint: weights, moments, no EMA.
    w.set(&Tensor::new(&[0.1f32, 0.2, 0.3], &Device::Cpu)?)?;
    let zeros = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
    let state = [("m.w".to_string(), zeros.clone()), ("v.w".to_string(), zeros)].into();
    opt.load_state(&state, 4, &Device::Cpu)?;
    let w0 = w.as_tensor().to_vec1::<f32>()?;
    opt.step(&grads(&[&w], &[vec![1.0, -2.0, 0.5]])?)?;
    let w1 = w.as_tensor().to_vec1::<f32>()?;
    let want: Vec<f32> = w0.iter().zip(&w1).map(|(a, b)| 0.5 * a + 0.5 * b).collect();
    assert_eq!(opt.ema()?["w"].to_vec1::<f32>()?, want);
    Ok(())
}
