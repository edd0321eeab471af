//! Stop strings on streamed text, as OpenAI's `stop` works: the output ends just before the first
//! occurrence of any stop string, which is not part of it. While the text ends with a prefix of a
//! stop string, that tail is held back (it may become a stop string with the next token), so a
//! streamed reply never shows text the finished reply does not have.

/// Finds stop strings in text that arrives piece by piece.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    stopped: bool,
}

impl StopStrings {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self { stops, ..Self::default() }
    }

    /// Adds a piece of text; returns the text that is now certain to be output (possibly empty).
    /// After a stop string appears, returns the text before it and then nothing.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.text.push_str(piece);
        // A stop string may start in the held-back tail: search from there.
        let from = self.released.saturating_sub(self.longest_stop());
        let from = (0..=from).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        let end = match hit {
            Some(at) => {
                self.stopped = true;
                at
            }
            None => self.text.len() - self.held_back(),
        };
        let end = end.max(self.released);
        let out = self.text[self.released..end].to_string();
        self.released = end;
        out
    }

    /// Whether a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text held back at the end of generation (no stop string followed it).
    pub fn flush(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }

    fn longest_stop(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let text = &self.text[self.released..];
        (1..=text.len().min(self.longest_stop()))
            .rev()
            .filter(|&n| text.is_char_boundary(text.len() - n))
            .find(|&n| {
                let tail = &text[text.len() - n..];
                self.stops.iter().any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStrings::new(&stops);
        let mut out: Vec<String> = pieces.iter().map(|p| s.push(p)).collect();
        out.push(s.flush());
        (out, s.stopped())
    }

    #[test]
    fn text_before_the_first_stop_string_is_released_and_nothing_after() {
        let (out, stopped) = run(&["\n\n", "END"], &["Hel", "lo E", "N", "D more"]);
        assert_eq!(out.concat(), "Hello ");
        assert!(stopped);
        // The "E" and "N" were held back until the stop string was complete.
        assert_eq!(out, ["Hel", "lo ", "", "", ""]);
    }

    #[test]
    fn a_held_back_prefix_is_released_when_it_turns_out_not_to_stop() {
        let (out, stopped) = run(&["END"], &["a E", "Nx", " b", "EN"]);
        assert_eq!(out, ["a ", "ENx", " b", "", "EN"]);
        assert!(!stopped);
    }

    #[test]
    fn stop_strings_across_pieces_and_multibyte_text() {
        let (out, stopped) = run(&["ö!"], &["größ", "e", "ö", "!", "x"]);
        assert_eq!(out.concat(), "größe");
        assert!(stopped);
        let (out, _) = run(&[], &["a", "b"]);
        assert_eq!(out.concat(), "ab");
    }
}
