//! What `prm eval` tells the user after the images are evaluated: the run's pace and where its
//! time went, then whatever the report records that the user should not miss.

use std::time::Instant;

use prm::eval::gpu::{GpuTargets, PASS_TOKENS};
use prm::eval::run::EvalOutcome;
use prm::eval::EvalEngine;

use super::EvalArgs;

/// Prints the run's timing and notes to stderr (`--quiet` keeps only the warnings about the
/// inputs themselves). `started` is when the command began, `evaluating` when the first pair
/// was handed to the engines.
pub(super) fn print_notes(
    args: &EvalArgs,
    outcome: &EvalOutcome,
    gpus: &[GpuTargets],
    engine_count: usize,
    has_classes: bool,
    started: Instant,
    evaluating: Instant,
) {
    if !args.quiet {
        let seconds = evaluating.elapsed().as_secs_f64();
        let total = outcome.total;
        let e = outcome.engine_time;
        let engines = match engine_count {
            1 => "the engine".to_string(),
            n => format!("the {n} engines (summed)"),
        };
        eprintln!(
            "evaluated {total} image pairs in {seconds:.2} s ({:.1} pairs/s), after {:.2} s of \
             set-up (model, class embeddings); {engines}: {:.2} s busy, {:.2} s waiting for a \
             batch; the batches waited {:.2} s for reading; the finisher (label maps, metrics, \
             files): {:.2} s busy",
            total as f64 / seconds.max(1e-9),
            (evaluating - started).as_secs_f64(),
            e.busy,
            e.idle,
            e.waiting_for_input,
            e.finisher_busy
        );
        if !gpus.is_empty() {
            let (mut passes, mut taken, mut pending) = (0, 0, 0);
            for u in gpus.iter().map(GpuTargets::pass_uploads) {
                (passes, taken, pending) =
                    (passes + u.passes, taken + u.taken, pending + u.copy_pending);
            }
            let logits = match (has_classes, gpus.first()) {
                (true, Some(g)) if g.forms_logits() => "; cosine logits formed on the device",
                (true, Some(_)) => "; cosine logits formed on the host (PRM_HOST_LOGITS=1)",
                _ => "",
            };
            eprintln!(
                "device passes: {passes} ({taken} took pixels staged ahead during the pass \
                 before, {pending} of them still copying when taken){logits}"
            );
        }
        if let Some(tokens) = gpus
            .iter()
            .map(GpuTargets::pass_tokens)
            .filter(|&t| t < PASS_TOKENS)
            .min()
        {
            eprintln!(
                "note: a pass ran out of device memory; passes were cut down to at most {tokens} \
                 tokens (the records are the same; a smaller --batch-size avoids the failed \
                 tries)"
            );
        }
        if outcome.batches_rerun_alone > 0 {
            eprintln!(
                "note: {} batches failed as a whole and were run again one pair at a time (their \
                 records are right, at batch 1's speed)",
                outcome.batches_rerun_alone
            );
        }
    }
    // Printed even with --quiet: the predictions themselves are in question.
    if outcome.report["text_weights_match"] == false {
        eprintln!(
            "warning: the class embeddings were made by another text tower ({}) than {}'s: \
             they lie in another embedding space, so the predictions mean nothing; embed the \
             classes with this checkpoint (`prm classes --model {}`)",
            outcome.report["text_weights"].as_str().unwrap_or("?"),
            args.model,
            args.model,
        );
    }
    if outcome.report["attack_weights_match"] == false && !args.quiet {
        eprintln!(
            "note: the adversarial images were made against other weights ({}) than {} ({}): \
             this measures a transfer between two encoders (pass the attack's --model to \
             evaluate the encoder they were made against)",
            outcome.report["attack"]["weights"].as_str().unwrap_or("?"),
            args.model,
            outcome.report["weights"].as_str().unwrap_or("?"),
        );
    }
    // Printed even with --quiet: not progress but a problem with the inputs, which the report
    // also records.
    if let Some(problem) = outcome.report["attack_record_error"].as_str() {
        eprintln!(
            "warning: {problem}: the images are evaluated all the same, but the report cannot \
             say which attack made them"
        );
    }
    let unmatched = outcome.report["unmatched_label_lines"]
        .as_u64()
        .unwrap_or(0);
    if unmatched > 0 && !args.quiet {
        eprintln!(
            "note: {unmatched} line(s) of --labels name no image of this run (e.g. {}); images \
             are named by their path relative to --clean",
            outcome.report["unmatched_label_examples"][0]
                .as_str()
                .unwrap_or("?")
        );
    }
}
