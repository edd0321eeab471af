//! The built-in corpus: a probabilistic grammar of short English-like sentences and addition
//! facts, generated on the fly (no download) with an exactly known entropy, so a training run can
//! print "model loss vs the best possible loss".
//!
//! A sentence is produced by one derivation: pick a template by weight, then fill each slot
//! independently. Word classes are disjoint and contain no separators, and every sentence ends
//! with `\n`, so the text determines the derivation. The entropy rate of the byte stream is then
//! `H / L` nats per byte, with `H` the entropy of one derivation and `L` the expected sentence
//! length in bytes (a renewal process). With byte tokens this is the lowest cross-entropy any
//! model can reach; a model that sees a window starting mid-sentence sits slightly above it.

/// One part of a template.
#[derive(Debug, Clone, Copy)]
pub enum Part {
    /// Fixed text.
    Lit(&'static str),
    /// One word, uniformly.
    Pick(&'static [&'static str]),
    /// With probability `p`, one word (uniformly) followed by a space; else nothing.
    Maybe(f64, &'static [&'static str]),
    /// A number uniform in `0..n`, written in decimal.
    Num(u32),
    /// The sum of the template's `Num` values so far (no entropy: it is determined).
    Sum,
}

/// A sentence shape and its probability weight.
#[derive(Debug, Clone)]
pub struct Template {
    pub weight: f64,
    pub parts: Vec<Part>,
}

/// A set of templates; see the module documentation for the entropy argument.
#[derive(Debug, Clone)]
pub struct Grammar {
    pub templates: Vec<Template>,
}

const DET: &[&str] = &["the", "a"];
const ADJ: &[&str] =
    &["red", "small", "happy", "old", "quiet", "bright", "brave", "tiny", "green", "lazy"];
const NOUN: &[&str] = &[
    "cat", "dog", "bird", "fox", "child", "robot", "farmer", "teacher", "river", "garden", "house",
    "tree", "ship", "king", "baker", "horse",
];
const VERB: &[&str] = &[
    "sees", "likes", "finds", "follows", "helps", "paints", "visits", "watches", "carries",
    "builds", "hears", "greets",
];

impl Grammar {
    /// The built-in grammar: 70% sentences `det [adj] noun verb det [adj] noun.`, 30% addition
    /// facts `a + b = c` with `a, b` uniform in 0..20 (the sum is determined: a model has to
    /// learn the 400 sums to predict it).
    pub fn builtin() -> Self {
        use Part::*;
        Self {
            templates: vec![
                Template {
                    weight: 0.7,
                    parts: vec![
                        Pick(DET),
                        Lit(" "),
                        Maybe(0.5, ADJ),
                        Pick(NOUN),
                        Lit(" "),
                        Pick(VERB),
                        Lit(" "),
                        Pick(DET),
                        Lit(" "),
                        Maybe(0.5, ADJ),
                        Pick(NOUN),
                        Lit(".\n"),
                    ],
                },
                Template {
                    weight: 0.3,
                    parts: vec![Num(20), Lit(" + "), Num(20), Lit(" = "), Sum, Lit("\n")],
                },
            ],
        }
    }

    fn total_weight(&self) -> f64 {
        self.templates.iter().map(|t| t.weight).sum()
    }

    /// Entropy of one derivation, in nats.
    pub fn sentence_entropy(&self) -> f64 {
        let total = self.total_weight();
        let mut h = 0.0;
        for t in &self.templates {
            let p = t.weight / total;
            if p > 0.0 {
                h -= p * p.ln();
            }
            let slots: f64 = t
                .parts
                .iter()
                .map(|part| match *part {
                    Part::Lit(_) | Part::Sum => 0.0,
                    Part::Pick(words) => (words.len() as f64).ln(),
                    Part::Maybe(q, words) => binary_entropy(q) + q * (words.len() as f64).ln(),
                    Part::Num(n) => (n as f64).ln(),
                })
                .sum();
            h += p * slots;
        }
        h
    }

    /// Expected sentence length in bytes.
    pub fn expected_length(&self) -> f64 {
        let total = self.total_weight();
        self.templates.iter().map(|t| t.weight / total * expected_template_length(t)).sum()
    }

    /// The entropy rate of the generated stream: the best achievable loss per byte token, nats.
    pub fn entropy_per_byte(&self) -> f64 {
        self.sentence_entropy() / self.expected_length()
    }

    /// Appends one sentence drawn with `rng` to `out`.
    pub fn sentence(&self, rng: &mut SplitMix64, out: &mut String) {
        let total = self.total_weight();
        let mut u = rng.next_f64() * total;
        let mut template = &self.templates[self.templates.len() - 1];
        for t in &self.templates {
            if u < t.weight {
                template = t;
                break;
            }
            u -= t.weight;
        }
        let mut sum = 0u64;
        for part in &template.parts {
            match *part {
                Part::Lit(s) => out.push_str(s),
                Part::Pick(words) => out.push_str(words[rng.below(words.len() as u64) as usize]),
                Part::Maybe(q, words) => {
                    if rng.next_f64() < q {
                        out.push_str(words[rng.below(words.len() as u64) as usize]);
                        out.push(' ');
                    }
                }
                Part::Num(n) => {
                    let v = rng.below(n as u64);
                    sum += v;
                    out.push_str(&v.to_string());
                }
                Part::Sum => out.push_str(&sum.to_string()),
            }
        }
    }

    /// At least `min_bytes` of text: whole sentences drawn from `seed`.
    pub fn generate(&self, seed: u64, min_bytes: usize) -> String {
        let mut rng = SplitMix64::new(seed);
        let mut out = String::with_capacity(min_bytes + 64);
        while out.len() < min_bytes {
            self.sentence(&mut rng, &mut out);
        }
        out
    }
}

fn binary_entropy(p: f64) -> f64 {
    [p, 1.0 - p].iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum()
}

fn digits(v: u64) -> usize {
    v.to_string().len()
}

fn expected_template_length(t: &Template) -> f64 {
    let mut len = 0.0;
    for part in &t.parts {
        len += match *part {
            Part::Lit(s) => s.len() as f64,
            Part::Pick(words) => mean_len(words),
            Part::Maybe(q, words) => q * (mean_len(words) + 1.0),
            Part::Num(n) => (0..n as u64).map(digits).sum::<usize>() as f64 / n as f64,
            Part::Sum => 0.0,
        };
    }
    // The sum's length depends on the numbers: average over all of their combinations.
    if t.parts.iter().any(|p| matches!(p, Part::Sum)) {
        let ranges: Vec<u64> = t
            .parts
            .iter()
            .filter_map(|p| if let Part::Num(n) = p { Some(*n as u64) } else { None })
            .collect();
        let combos: u64 = ranges.iter().product();
        let mut total = 0usize;
        for mut code in 0..combos {
            let mut sum = 0;
            for &n in &ranges {
                sum += code % n;
                code /= n;
            }
            total += digits(sum);
        }
        len += total as f64 / combos as f64;
    }
    len
}

fn mean_len(words: &[&str]) -> f64 {
    words.iter().map(|w| w.len()).sum::<usize>() as f64 / words.len() as f64
}

/// SplitMix64 (Steele et al. 2014): tiny, fast, and its whole state is one `u64`, which makes
/// data order reproducible from a seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every derivation of `g` with its probability, by brute force.
    fn enumerate(g: &Grammar) -> Vec<(String, f64)> {
        let total = g.total_weight();
        let mut out = Vec::new();
        for t in &g.templates {
            let mut partial: Vec<(String, f64, u64)> = vec![(String::new(), t.weight / total, 0)];
            for part in &t.parts {
                let mut next = Vec::new();
                for (s, p, sum) in partial {
                    match *part {
                        Part::Lit(l) => next.push((s + l, p, sum)),
                        Part::Pick(words) => {
                            for w in words {
                                next.push((format!("{s}{w}"), p / words.len() as f64, sum));
                            }
                        }
                        Part::Maybe(q, words) => {
                            next.push((s.clone(), p * (1.0 - q), sum));
                            for w in words {
                                next.push((format!("{s}{w} "), p * q / words.len() as f64, sum));
                            }
                        }
                        Part::Num(n) => {
                            for v in 0..n as u64 {
                                next.push((format!("{s}{v}"), p / n as f64, sum + v));
                            }
                        }
                        Part::Sum => next.push((format!("{s}{sum}"), p, sum)),
                    }
                }
                partial = next;
            }
            out.extend(partial.into_iter().map(|(s, p, _)| (s, p)));
        }
        out
    }

    /// A reduced grammar with the same kinds of parts, small enough to enumerate.
    fn reduced() -> Grammar {
        use Part::*;
        Grammar {
            templates: vec![
                Template {
                    weight: 2.0,
                    parts: vec![
                        Pick(DET),
                        Lit(" "),
                        Maybe(0.3, &ADJ[..3]),
                        Pick(&NOUN[..4]),
                        Lit(" "),
                        Pick(&VERB[..2]),
                        Lit(".\n"),
                    ],
                },
                Template {
                    weight: 1.0,
                    parts: vec![Num(12), Lit(" + "), Num(7), Lit(" = "), Sum, Lit("\n")],
                },
            ],
        }
    }

    #[test]
    fn analytic_entropy_and_length_match_brute_force() {
        let g = reduced();
        let all = enumerate(&g);
        // Injective: the text determines the derivation, so H(text) = H(derivation).
        let mut by_text: HashMap<&str, f64> = HashMap::new();
        for (s, p) in &all {
            assert!(by_text.insert(s.as_str(), *p).is_none(), "two derivations give {s:?}");
        }
        let h: f64 = all.iter().map(|(_, p)| -p * p.ln()).sum();
        let len: f64 = all.iter().map(|(s, p)| p * s.len() as f64).sum();
        assert!((all.iter().map(|(_, p)| p).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((g.sentence_entropy() - h).abs() < 1e-9, "{} vs {h}", g.sentence_entropy());
        assert!((g.expected_length() - len).abs() < 1e-9, "{} vs {len}", g.expected_length());
    }

    #[test]
    fn builtin_word_classes_are_disjoint_and_separator_free() {
        let classes = [DET, ADJ, NOUN, VERB];
        let mut seen = std::collections::HashSet::new();
        for class in classes {
            for w in class {
                assert!(w.chars().all(|c| c.is_ascii_lowercase()), "{w}");
                assert!(seen.insert(*w), "`{w}` is in two classes");
            }
        }
    }

    #[test]
    fn sampled_statistics_match_the_analytic_values() {
        let g = Grammar::builtin();
        // Sentence count and byte count of a long sample agree with the expected length.
        let text = g.generate(42, 2_000_000);
        let sentences = text.matches('\n').count() as f64;
        let mean = text.len() as f64 / sentences;
        assert!(
            (mean - g.expected_length()).abs() / g.expected_length() < 0.01,
            "{mean} vs {}",
            g.expected_length()
        );
        // Arithmetic lines are correct.
        for line in text.lines().filter(|l| l.contains('+')).take(1000) {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            assert_eq!(nums[0] + nums[1], nums[2], "{line}");
        }
        let rate = g.entropy_per_byte();
        assert!(rate > 0.3 && rate < 1.5, "{rate}");
    }

    #[test]
    fn generation_is_a_function_of_the_seed() {
        let g = Grammar::builtin();
        assert_eq!(g.generate(7, 10_000), g.generate(7, 10_000));
        assert_ne!(g.generate(7, 10_000), g.generate(8, 10_000));
    }
}
