//! Checking generated answers and scoring them: the exact-answer checker (the number after
//! `####` as GSM8K writes it, else the last number in the text, compared numerically; answers
//! that are not numbers compare as trimmed strings), the unbiased pass@k estimator of Chen et
//! al. 2021 (HumanEval), and the Wilson 95% interval of an accuracy.

/// The answer a model's text gives: after the last `####` when there is one, else the last
/// number in the text (commas inside numbers dropped: `1,234` is 1234), else the trimmed text.
pub fn extract_answer(text: &str) -> String {
    let tail = match text.rfind("####") {
        Some(i) => &text[i + 4..],
        None => text,
    };
    match numbers(tail).last() {
        // After `####` GSM8K puts the number first; elsewhere the last number is the answer.
        Some(_) if text.contains("####") => numbers(tail).remove(0),
        Some(last) => last.clone(),
        None => tail.trim().to_string(),
    }
}

/// The numbers in `text`, in order, as written without thousands separators (`-3`, `2.5`,
/// `1,234` → `1234`).
fn numbers(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '-' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()));
        if !starts {
            i += 1;
            continue;
        }
        let mut s = String::new();
        if chars[i] == '-' {
            s.push('-');
            i += 1;
        }
        while i < chars.len() {
            let c = chars[i];
            let digit_follows = chars.get(i + 1).is_some_and(|c| c.is_ascii_digit());
            if c.is_ascii_digit() {
                s.push(c);
            } else if c == ',' && digit_follows {
                // thousands separator
            } else if c == '.' && digit_follows && !s.contains('.') {
                s.push(c);
            } else {
                break;
            }
            i += 1;
        }
        out.push(s);
    }
    out
}

/// Whether `text` answers `gold`: numerically equal when both are numbers, else equal as
/// trimmed strings.
pub fn is_correct(text: &str, gold: &str) -> bool {
    let given = extract_answer(text);
    let gold_clean = gold.trim().replace(',', "");
    match (given.parse::<f64>(), gold_clean.parse::<f64>()) {
        (Ok(a), Ok(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        _ => given.trim() == gold.trim(),
    }
}

/// The unbiased estimate of pass@k from `n` samples of which `c` are correct:
/// `1 − C(n−c, k) / C(n, k)` (Chen et al. 2021), computed as a product to stay exact for
/// large `n`. Needs `1 ≤ k ≤ n` and `c ≤ n`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(k >= 1 && k <= n && c <= n, "pass@k needs 1 ≤ k ≤ n and c ≤ n");
    if n - c < k {
        return 1.0;
    }
    // C(n−c, k)/C(n, k) = Π_{i = n−c+1}^{n} (1 − k/i).
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// The Wilson score interval (95%) of `correct` successes in `n` trials.
pub fn wilson_interval(correct: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, correct as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `C(n, k)` exactly, for the closed form.
    fn choose(n: u64, k: u64) -> f64 {
        if k > n {
            return 0.0;
        }
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    }

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        for (n, c, k) in [(10, 3, 1), (10, 3, 5), (20, 0, 4), (5, 5, 5), (200, 13, 10), (8, 7, 2)] {
            let closed = 1.0 - choose((n - c) as u64, k as u64) / choose(n as u64, k as u64);
            let got = pass_at_k(n, c, k);
            assert!((got - closed).abs() < 1e-12, "n {n} c {c} k {k}: {got} vs {closed}");
        }
        // pass@1 is the fraction correct.
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn the_checker_reads_numbers_as_people_write_them() {
        assert!(is_correct("so the total is 1,234 apples", "1234"));
        assert!(is_correct("It falls by 7, to -12.", "-12"));
        assert!(is_correct("Work: 3+4=7\n#### 7", "7"));
        assert!(is_correct("#### 1,000,000 dollars in all, not 5", "1000000"));
        assert!(is_correct("the answer: 2.50", "2.5"));
        assert!(!is_correct("the answer is 19 or so, 20 maybe", "19"), "the last number counts");
        assert!(!is_correct("I do not know", "4"));
        assert!(is_correct("  Paris ", "Paris"), "non-numeric answers compare as strings");
        assert!(!is_correct("paris", "Paris"));
        assert_eq!(extract_answer("no digits here"), "no digits here");
        assert_eq!(extract_answer("a-b 5-3"), "-3", "a minus sign before a digit is a sign");
    }

    #[test]
    fn wilson_interval_contains_the_estimate() {
        let (lo, hi) = wilson_interval(28, 40);
        assert!(lo < 0.7 && 0.7 < hi && lo > 0.5 && hi < 0.85, "{lo} {hi}");
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson_interval(40, 40);
        assert!(hi == 1.0 && lo > 0.9);
    }
}
