//! The text side of streaming generation, independent of any tokenizer library: sampled token ids
//! become display-ready text without splitting UTF-8 characters, without ever showing a stop
//! string, and with DeepSeek-R1's reasoning kept apart from its answer.

/// What byte-level BPE decoding yields for bytes that are not (yet) a whole UTF-8 character.
const REPLACEMENT: char = '\u{FFFD}';

/// Pending tokens after which [`IncrementalDecoder`] looks for a place to cut its window short,
/// and how many of the latest token boundaries it tries. A partial character is at most three
/// bytes, but byte-level tokens can each end inside one, so runs of emoji or rare CJK characters
/// may legitimately stay unfinished for a while.
const MAX_PENDING: usize = 8;

/// Pending tokens after which [`IncrementalDecoder`] gives up waiting and releases everything.
/// Only output that is garbage (no whole character for this long, and no safe cut) gets here;
/// releasing it may show one U+FFFD too many, which beats a window that grows forever.
const HARD_LIMIT: usize = 64;

/// The literal text of the token that ends DeepSeek-R1's reasoning, for looking up its id.
pub const THINK_CLOSE: &str = "</think>";

/// Decodes token ids to text: the seam between this module and a real tokenizer.
///
/// Decoding must work like byte-level BPE in HF `tokenizers`: bytes that do not form a whole
/// UTF-8 character come out as U+FFFD, which is how a character still in flight is recognised.
pub trait TokenText {
    /// Decodes `ids`, taken as one contiguous run of tokens, to text.
    fn decode(&self, ids: &[u32]) -> String;
}

impl<F: Fn(&[u32]) -> String> TokenText for F {
    fn decode(&self, ids: &[u32]) -> String {
        self(ids)
    }
}

/// Turns token ids into text one token at a time, never splitting a UTF-8 character.
///
/// Uses the prefix/read offset technique of text-generation-inference and vLLM: each step decodes
/// only a short window (the tokens of the last completed piece, kept as context for decoders that
/// look at the preceding token, plus the tokens not yet fully shown), so the cost per token does
/// not grow with the length of the generation.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    /// The window: `ids[..read_offset]` is context whose text was already returned.
    ids: Vec<u32>,
    read_offset: usize,
    /// Bytes of `decode(ids)` already returned, context included.
    emitted: usize,
}

impl IncrementalDecoder {
    /// Creates a decoder at the start of a text.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id` and returns the text it completes; empty while the text ends in an unfinished
    /// character.
    ///
    /// Text before a trailing run of U+FFFD is returned at once even when the run is held back,
    /// because appending bytes cannot change characters that are already whole. A literal U+FFFD
    /// in the output looks like an unfinished character, so it waits for the next whole
    /// character, for [`finish`](Self::finish), or for a few tokens at most.
    #[must_use]
    pub fn push(&mut self, text: &impl TokenText, id: u32) -> String {
        self.ids.push(id);
        let full = text.decode(&self.ids);
        let stable = full.trim_end_matches(REPLACEMENT).len();
        let mut out = slice_between(&full, self.emitted, stable).to_owned();
        self.emitted = self.emitted.max(stable);
        if stable == full.len() {
            // Ending on a whole character makes this a clean cut: what comes next cannot change
            // what is before it, so the shown tokens shrink to the context for the next piece.
            self.ids.drain(..self.read_offset);
            self.read_offset = self.ids.len();
            self.emitted = text.decode(&self.ids).len();
        } else if self.ids.len() - self.read_offset > MAX_PENDING {
            out.push_str(&self.force_cut(text));
        }
        out
    }

    /// Returns whatever text is still held back, even an unfinished character (as U+FFFD), and
    /// starts over.
    #[must_use]
    pub fn finish(&mut self, text: &impl TokenText) -> String {
        let out = if self.ids.len() > self.read_offset {
            let full = text.decode(&self.ids);
            slice_between(&full, self.emitted, full.len()).to_owned()
        } else {
            String::new()
        };
        self.reset();
        out
    }

    /// Forgets all tokens, as at the start of a new text.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.read_offset = 0;
        self.emitted = 0;
    }

    /// Bounds the window when its text has not ended in a whole character for a while, by
    /// cutting it at one of the latest token boundaries where that provably loses nothing, and
    /// returns text that the cut shows to be final.
    fn force_cut(&mut self, text: &impl TokenText) -> String {
        // Tokens that decode to nothing on their own (skipped special tokens) carry no bytes, so
        // dropping them loses no text; it may even be enough to get under the limit.
        let pending = self.ids.split_off(self.read_offset);
        self.ids.extend(
            pending
                .into_iter()
                .filter(|&id| !text.decode(&[id]).is_empty()),
        );
        let len = self.ids.len();
        if len - self.read_offset <= MAX_PENDING {
            return String::new();
        }
        let full = text.decode(&self.ids);
        let lowest = (self.read_offset + 1).max(len.saturating_sub(MAX_PENDING));
        for cut in (lowest..len).rev() {
            let tail = text.decode(&self.ids[cut..]);
            if let Some(emitted) = offset_past_cut(&full, &tail, self.emitted) {
                self.cut_at(cut, emitted);
                return String::new();
            }
            // Decoding both sides apart gives the same text as together: for byte-level
            // decoding (with bytes after the cut) no character spans the cut, since joining a
            // partial character to its continuation always changes the number of U+FFFD. Then
            // even U+FFFD before the cut is final.
            let head = text.decode(&self.ids[..cut]);
            if !tail.is_empty()
                && head.len() + tail.len() == full.len()
                && full.starts_with(&head)
                && full.ends_with(&tail)
            {
                let out = slice_between(&full, self.emitted, head.len()).to_owned();
                self.cut_at(cut, self.emitted.saturating_sub(head.len()));
                return out;
            }
        }
        if len - self.read_offset > HARD_LIMIT {
            let out = slice_between(&full, self.emitted, full.len()).to_owned();
            self.reset();
            return out;
        }
        String::new()
    }

    /// Drops the tokens before `cut`, leaving no context; `emitted` is the offset into the
    /// decoding of what remains.
    fn cut_at(&mut self, cut: usize, emitted: usize) {
        self.ids.drain(..cut);
        self.read_offset = 0;
        self.emitted = emitted;
    }
}

/// Where offset `emitted` of `full`, the text of the window, lies in `tail`, the text of the
/// window's tokens from some cut on, if dropping the tokens before the cut cannot change the text
/// still to come.
///
/// In byte-level decoding, the cut may split a character; its continuation bytes then decode
/// alone as one U+FFFD each, and once a byte that is not a continuation follows them, the two
/// decodings agree from there on, whatever comes later. A whole character in `tail` shows that
/// such a byte exists, and everything up to it must already be shown.
fn offset_past_cut(full: &str, tail: &str, emitted: usize) -> Option<usize> {
    let mapped = (emitted + tail.len()).checked_sub(full.len())?;
    let rest = tail.trim_start_matches(REPLACEMENT);
    let lead = tail.len() - rest.len();
    let agree = full
        .get(emitted..)
        .is_some_and(|f| tail.get(mapped..) == Some(f));
    (!rest.is_empty() && mapped >= lead && agree).then_some(mapped)
}

/// `s[start..end]`, widened or narrowed to character boundaries, empty when out of range, because
/// a decoder that re-decodes earlier tokens differently must not make this module panic.
fn slice_between(s: &str, start: usize, end: usize) -> &str {
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    let end = (0..=end.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    s.get(start..end).unwrap_or("")
}

/// What a [`StopMatcher`] lets through for one chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that can be shown now: no stop string can start in it any more.
    pub emit: String,
    /// A stop string matched: the generation should end, and nothing after `emit` is to be shown.
    pub stopped: bool,
}

/// Finds stop strings in text that arrives in arbitrary chunks, holding back only what could
/// still turn out to be the start of one.
///
/// The text is cut at the earliest position where any stop string occurs, whatever the chunking.
/// That is why, when one stop string completes while a longer one that started earlier may still
/// complete, the matcher keeps waiting instead of stopping at the first completion.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Longest stop string in bytes, which bounds how much text can ever be held back.
    max_len: usize,
    held: String,
    stopped: bool,
    /// Index in `stops` of the stop string that ended the text.
    matched: Option<usize>,
}

impl StopMatcher {
    /// Creates a matcher for `stops`; empty strings are ignored, since they would match
    /// everywhere.
    #[must_use]
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            max_len,
            held: String::new(),
            stopped: false,
            matched: None,
        }
    }

    /// The stop string that ended the text, once stopped.
    #[must_use]
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Adds `chunk` and returns the text that is safe to show; once stopped, returns nothing more.
    #[must_use]
    pub fn push(&mut self, chunk: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(chunk);
        let matched = self.earliest_match(&buf);
        match (
            matched,
            self.earliest_partial(&buf, matched.unwrap_or(buf.len())),
        ) {
            (Some(at), None) => {
                buf.truncate(at);
                self.stopped = true;
            }
            (_, Some(from)) => self.held = buf.split_off(from),
            (None, None) => {}
        }
        StopOutcome {
            emit: buf,
            stopped: self.stopped,
        }
    }

    /// Releases the held-back text, cut before a stop string if one is complete in it (which
    /// then counts as stopped); for the end of the stream or of a segment.
    #[must_use]
    pub fn flush(&mut self) -> String {
        let mut held = std::mem::take(&mut self.held);
        if let Some(at) = self.earliest_match(&held) {
            held.truncate(at);
            self.stopped = true;
        }
        held
    }

    /// Whether a stop string has matched since creation or the last [`reset`](Self::reset).
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Drops held-back text and the stopped state, keeping the stop strings.
    pub fn reset(&mut self) {
        self.held.clear();
        self.stopped = false;
        self.matched = None;
    }

    /// Where the earliest stop string in `text` starts, remembering which one it is (the first
    /// listed among those starting there).
    fn earliest_match(&mut self, text: &str) -> Option<usize> {
        let (at, i) = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| text.find(s.as_str()).map(|at| (at, i)))
            .min()?;
        self.matched = Some(i);
        Some(at)
    }

    /// Earliest char boundary before `limit` from which the rest of `text` is a proper prefix of
    /// some stop string, i.e. where a stop string may have begun without being complete yet.
    fn earliest_partial(&self, text: &str, limit: usize) -> Option<usize> {
        // A proper prefix is shorter than its stop string, so only the last `max_len - 1` bytes
        // can start one; this keeps the scan independent of the chunk size.
        let lo = (text.len() + 1).saturating_sub(self.max_len);
        (lo..limit.min(text.len())).find(|&i| {
            text.get(i..).is_some_and(|rest| {
                self.stops
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            })
        })
    }
}

/// Which part of a DeepSeek-R1 response a piece of text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Segment {
    /// The chain of thought before `</think>`.
    Reasoning,
    /// The answer after `</think>`.
    Answer,
}

/// What a sampled token means for the reasoning/answer split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenRole {
    /// A token whose text belongs to the given segment.
    Text(Segment),
    /// The `</think>` token: a marker with no text of its own.
    ThinkClose,
}

/// Tells reasoning tokens from answer tokens by watching for the `</think>` token id.
///
/// Working on the id rather than on decoded text means a `</think>` split over several tokens or
/// quoted in the text can never switch segments.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    think_close_id: u32,
    segment: Segment,
}

impl ReasoningSplitter {
    /// Creates a splitter; `starts_in_reasoning` is true when the prompt already opened the
    /// reasoning (R1's chat template ends with `<think>\n`).
    #[must_use]
    pub fn new(think_close_id: u32, starts_in_reasoning: bool) -> Self {
        let segment = if starts_in_reasoning {
            Segment::Reasoning
        } else {
            Segment::Answer
        };
        Self {
            think_close_id,
            segment,
        }
    }

    /// Classifies the next sampled token; `</think>` moves to the answer for good, and a stray
    /// one inside the answer is still reported as a text-less marker.
    #[must_use]
    pub fn classify(&mut self, id: u32) -> TokenRole {
        if id == self.think_close_id {
            self.segment = Segment::Answer;
            TokenRole::ThinkClose
        } else {
            TokenRole::Text(self.segment)
        }
    }

    /// The segment the next text token belongs to.
    #[must_use]
    pub fn segment(&self) -> Segment {
        self.segment
    }
}

/// Splits complete response text at the last literal `</think>` into (reasoning, answer); text
/// without one is all reasoning, as the response never left the reasoning.
#[must_use]
pub fn split_reasoning(text: &str) -> (String, String) {
    match text.rfind(THINK_CLOSE) {
        Some(at) => (
            text[..at].to_owned(),
            text[at + THINK_CLOSE.len()..].to_owned(),
        ),
        None => (text.to_owned(), String::new()),
    }
}

/// One thing for the caller to show or act on while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// New text (never empty) of one segment.
    Text {
        /// The segment the text belongs to.
        segment: Segment,
        /// The text to append to that segment.
        text: String,
    },
    /// A stop string matched: generation should end; nothing more will be emitted.
    Stopped,
}

/// The text side of one generation: incremental decoding, stop strings and the reasoning/answer
/// split together.
///
/// Each segment gets its own decoder window and stop matching, so neither a character nor a stop
/// string can straddle `</think>`.
#[derive(Debug, Clone)]
pub struct TextStream {
    decoder: IncrementalDecoder,
    matcher: StopMatcher,
    splitter: ReasoningSplitter,
    reasoning: String,
    answer: String,
    stopped: bool,
}

impl TextStream {
    /// Creates the stream for one generation; see [`StopMatcher::new`] and
    /// [`ReasoningSplitter::new`] for the arguments.
    #[must_use]
    pub fn new(stops: Vec<String>, think_close_id: u32, starts_in_reasoning: bool) -> Self {
        Self {
            decoder: IncrementalDecoder::new(),
            matcher: StopMatcher::new(stops),
            splitter: ReasoningSplitter::new(think_close_id, starts_in_reasoning),
            reasoning: String::new(),
            answer: String::new(),
            stopped: false,
        }
    }

    /// Adds a sampled token and returns what it makes showable; nothing once stopped.
    #[must_use]
    pub fn push(&mut self, text: &impl TokenText, id: u32) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if self.stopped {
            return events;
        }
        let was = self.splitter.segment();
        match self.splitter.classify(id) {
            TokenRole::Text(segment) => {
                let piece = self.decoder.push(text, id);
                let outcome = self.matcher.push(&piece);
                self.emit(&mut events, segment, outcome.emit);
                if outcome.stopped {
                    self.stop(&mut events);
                }
            }
            TokenRole::ThinkClose if was == Segment::Reasoning => {
                self.close_segment(text, Segment::Reasoning, &mut events);
                self.decoder.reset();
                self.matcher.reset();
            }
            // A second `</think>` has nothing to close; its id must not reach the decoder.
            TokenRole::ThinkClose => {}
        }
        events
    }

    /// Ends the generation, releasing all held-back text; nothing if already stopped.
    #[must_use]
    pub fn finish(&mut self, text: &impl TokenText) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if !self.stopped {
            self.close_segment(text, self.splitter.segment(), &mut events);
        }
        events
    }

    /// All reasoning text emitted so far.
    #[must_use]
    pub fn reasoning(&self) -> &str {
        &self.reasoning
    }

    /// All answer text emitted so far.
    #[must_use]
    pub fn answer(&self) -> &str {
        &self.answer
    }

    /// The segment the next text token belongs to.
    #[must_use]
    pub fn segment(&self) -> Segment {
        self.splitter.segment()
    }

    /// Whether a stop string has ended the generation.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The stop string that ended the generation, if one did.
    #[must_use]
    pub fn stop_string(&self) -> Option<&str> {
        if self.stopped {
            self.matcher.matched()
        } else {
            None
        }
    }

    /// Releases everything the decoder and the stop matcher hold for `segment`.
    fn close_segment(
        &mut self,
        text: &impl TokenText,
        segment: Segment,
        events: &mut Vec<StreamEvent>,
    ) {
        let tail = self.decoder.finish(text);
        let mut outcome = self.matcher.push(&tail);
        if !outcome.stopped {
            outcome.emit.push_str(&self.matcher.flush());
        }
        self.emit(events, segment, outcome.emit);
        if self.matcher.is_stopped() {
            self.stop(events);
        }
    }

    fn emit(&mut self, events: &mut Vec<StreamEvent>, segment: Segment, text: String) {
        if text.is_empty() {
            return;
        }
        match segment {
            Segment::Reasoning => self.reasoning.push_str(&text),
            Segment::Answer => self.answer.push_str(&text),
        }
        events.push(StreamEvent::Text { segment, text });
    }

    fn stop(&mut self, events: &mut Vec<StreamEvent>) {
        self.stopped = true;
        events.push(StreamEvent::Stopped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A byte-level tokenizer stand-in: token `i` is the byte string `self.0[i]`, and decoding
    /// is lossy over the concatenated bytes, exactly like byte-level BPE. Unknown ids decode to
    /// nothing, like skipped special tokens.
    pub(super) struct ByteVocab(pub(super) Vec<Vec<u8>>);

    impl TokenText for ByteVocab {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids
                .iter()
                .filter_map(|&id| self.0.get(id as usize))
                .flatten()
                .copied()
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    /// A vocabulary with one token per piece, plus the ids `0..pieces.len()` in order.
    fn vocab(pieces: &[&[u8]]) -> (ByteVocab, Vec<u32>) {
        let ids = (0..pieces.len() as u32).collect();
        (ByteVocab(pieces.iter().map(|p| p.to_vec()).collect()), ids)
    }

    fn decode_all(vocab: &ByteVocab, ids: &[u32]) -> (Vec<String>, String) {
        let mut decoder = IncrementalDecoder::new();
        let pieces = ids.iter().map(|&id| decoder.push(vocab, id)).collect();
        (pieces, decoder.finish(vocab))
    }

    const CLOSE: u32 = 1_000;

    /// Runs a whole generation through a fresh stream, returning it and all its events.
    fn stream_all(
        vocab: &ByteVocab,
        ids: &[u32],
        stops: &[&str],
        starts_in_reasoning: bool,
    ) -> (TextStream, Vec<StreamEvent>) {
        let mut stream = TextStream::new(
            stops.iter().map(|s| s.to_string()).collect(),
            CLOSE,
            starts_in_reasoning,
        );
        let mut events = Vec::new();
        for &id in ids {
            events.extend(stream.push(vocab, id));
        }
        events.extend(stream.finish(vocab));
        (stream, events)
    }

    fn text_of(events: &[StreamEvent], want: Segment) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Text { segment, text } if *segment == want => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn stopped_count(events: &[StreamEvent]) -> usize {
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Stopped))
            .count()
    }

    #[test]
    fn closure_is_token_text() {
        let text = |ids: &[u32]| ids.iter().map(|id| id.to_string()).collect::<String>();
        let mut decoder = IncrementalDecoder::new();
        assert_eq!(decoder.push(&text, 4), "4");
        assert_eq!(decoder.push(&text, 2), "2");
        assert_eq!(decoder.finish(&text), "");
    }

    #[test]
    fn ascii_tokens_come_out_one_by_one() {
        let (v, ids) = vocab(&[b"Hello", b",", b" world"]);
        let (pieces, rest) = decode_all(&v, &ids);
        assert_eq!(pieces, ["Hello", ",", " world"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn emoji_split_over_four_byte_tokens_comes_out_whole_once_complete() {
        let (v, ids) = vocab(&[b"\xF0", b"\x9F", b"\x98", b"\x80"]);
        let (pieces, rest) = decode_all(&v, &ids);
        assert_eq!(pieces, ["", "", "", "😀"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn whole_characters_before_a_partial_one_are_not_held_back() {
        let (v, ids) = vocab(&[b"ab\xE2", b"\x82", b"\xACc"]);
        let (pieces, rest) = decode_all(&v, &ids);
        assert_eq!(pieces, ["ab", "", "€c"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn finish_releases_an_unfinished_character() {
        let (v, ids) = vocab(&[b"a", b"\xE2\x82"]);
        let (pieces, rest) = decode_all(&v, &ids);
        assert_eq!(pieces, ["a", ""]);
        assert_eq!(rest, "\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_come_out_as_replacement_once_followed() {
        let (v, ids) = vocab(&[b"\x80", b"x"]);
        let (pieces, rest) = decode_all(&v, &ids);
        assert_eq!(pieces, ["", "\u{FFFD}x"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn reset_forgets_pending_bytes() {
        let (v, _) = vocab(&[b"\xE2\x82", b"\xAC", b"z"]);
        let mut decoder = IncrementalDecoder::new();
        assert_eq!(decoder.push(&v, 0), "");
        decoder.reset();
        // The continuation byte now stands alone, so it is invalid rather than completing '€'.
        assert_eq!(decoder.push(&v, 1), "");
        assert_eq!(decoder.push(&v, 2), "\u{FFFD}z");
    }

    #[test]
    fn literal_replacement_characters_are_released_within_a_bounded_delay() {
        let (v, _) = vocab(&["\u{FFFD}".as_bytes()]);
        let mut decoder = IncrementalDecoder::new();
        let mut shown = String::new();
        for _ in 0..40 {
            shown.push_str(&decoder.push(&v, 0));
        }
        assert!(shown.chars().count() >= 40 - MAX_PENDING - 1, "{shown:?}");
        shown.push_str(&decoder.finish(&v));
        assert_eq!(shown, "\u{FFFD}".repeat(40));
    }

    #[test]
    fn decoded_window_stays_small_over_a_long_generation() {
        let (v, _) = vocab(&[
            b"word ",
            b"\xE4",
            b"\xBD",
            b"\xA0",
            "\u{FFFD}".as_bytes(),
            b"\x80",
            b"",
        ]);
        let widest = Cell::new(0);
        let text = |ids: &[u32]| {
            widest.set(widest.get().max(ids.len()));
            v.decode(ids)
        };
        let mut decoder = IncrementalDecoder::new();
        let mut all = Vec::new();
        let mut shown = String::new();
        for i in 0..5_000u32 {
            // Long runs of replacement characters and invalid bytes mixed with real text.
            let id = match i % 97 {
                0..=29 => 4,
                30..=49 => 5,
                50..=59 => 6,
                n => [0, 1, 2, 3][(n % 4) as usize],
            };
            all.push(id);
            shown.push_str(&decoder.push(&text, id));
        }
        shown.push_str(&decoder.finish(&text));
        assert_eq!(shown, v.decode(&all));
        assert!(
            widest.get() <= 2 * MAX_PENDING + 2,
            "window {}",
            widest.get()
        );
    }

    #[test]
    fn long_runs_of_tokens_ending_inside_characters_stay_exact_in_a_small_window() {
        // Every token ends inside a character, so the text never ends whole until the last one.
        let text = "😀".repeat(40) + "!";
        let (first, rest) = text.as_bytes().split_at(1);
        let pieces: Vec<&[u8]> = [first].into_iter().chain(rest.chunks(4)).collect();
        let (v, ids) = vocab(&pieces);
        let widest = Cell::new(0);
        let counting = |ids: &[u32]| {
            widest.set(widest.get().max(ids.len()));
            v.decode(ids)
        };
        let mut decoder = IncrementalDecoder::new();
        let mut shown = String::new();
        let mut bytes = 0;
        for (&id, piece) in ids.iter().zip(&pieces) {
            shown.push_str(&decoder.push(&counting, id));
            bytes += piece.len();
            // Every whole character is out as soon as its last byte is in.
            let whole = (0..=bytes).rev().find(|&i| text.is_char_boundary(i));
            assert_eq!(Some(shown.len()), whole);
        }
        assert_eq!(decoder.finish(&counting), "");
        assert_eq!(shown, text);
        assert!(
            widest.get() <= 2 * MAX_PENDING + 2,
            "window {}",
            widest.get()
        );
    }

    #[test]
    fn garbage_without_any_safe_cut_is_released_at_the_hard_limit() {
        // "E2 82" is a partial '€' cut short by the next "E2" every time: pure U+FFFD, and every
        // token boundary sits inside a partial character.
        let (v, _) = vocab(&[b"\xE2", b"\x82\xE2"]);
        let widest = Cell::new(0);
        let counting = |ids: &[u32]| {
            widest.set(widest.get().max(ids.len()));
            v.decode(ids)
        };
        let mut decoder = IncrementalDecoder::new();
        let mut shown = decoder.push(&counting, 0);
        for _ in 0..300 {
            shown.push_str(&decoder.push(&counting, 1));
        }
        shown.push_str(&decoder.finish(&counting));
        assert!(shown.chars().all(|c| c == REPLACEMENT));
        assert!(shown.chars().count() >= 301);
        assert!(widest.get() <= HARD_LIMIT + 1, "window {}", widest.get());
    }

    #[test]
    fn a_foreign_decoder_changing_earlier_text_cannot_panic() {
        // Decodes each window to a different width, as a misbehaving tokenizer might.
        let text = |ids: &[u32]| "é".repeat(ids.len() % 3) + &"\u{FFFD}".repeat(ids.len() % 2);
        let mut decoder = IncrementalDecoder::new();
        let mut shown: String = (0..50).map(|id| decoder.push(&text, id)).collect();
        shown.push_str(&decoder.finish(&text));
        assert!(shown.chars().all(|c| c == 'é' || c == REPLACEMENT));
    }

    fn stop_all(stops: &[&str], chunks: &[&str]) -> (Vec<StopOutcome>, String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let outcomes: Vec<_> = chunks.iter().map(|c| m.push(c)).collect();
        let rest = m.flush();
        (outcomes, rest, m.is_stopped())
    }

    fn emitted(outcomes: &[StopOutcome]) -> String {
        outcomes.iter().map(|o| o.emit.as_str()).collect()
    }

    #[test]
    fn no_stop_strings_pass_everything_through() {
        let (outcomes, rest, stopped) = stop_all(&["", ""], &["ab", "", "c"]);
        assert_eq!(emitted(&outcomes), "abc");
        assert_eq!(rest, "");
        assert!(!stopped);
    }

    #[test]
    fn stop_inside_one_chunk_cuts_before_it() {
        let (outcomes, rest, stopped) = stop_all(&["STOP"], &["abSTOPcd", "more"]);
        assert_eq!(outcomes[0].emit, "ab");
        assert!(outcomes[0].stopped);
        assert_eq!(
            outcomes[1],
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(rest, "");
        assert!(stopped);
    }

    #[test]
    fn stop_spanning_chunks_never_leaks() {
        let (outcomes, _, stopped) = stop_all(&["<|im_end|>"], &["done<|", "im", "_e", "nd|>x"]);
        assert_eq!(
            outcomes.iter().map(|o| o.emit.as_str()).collect::<Vec<_>>(),
            ["done", "", "", ""]
        );
        assert!(outcomes[3].stopped);
        assert!(stopped);
    }

    #[test]
    fn holds_back_only_the_longest_suffix_that_can_start_a_stop() {
        let mut m = StopMatcher::new(vec!["abc".into()]);
        assert_eq!(m.push("xxaab").emit, "xxa");
        assert_eq!(m.push("d").emit, "abd");
        assert_eq!(m.push("a").emit, "");
        assert_eq!(m.flush(), "a");
        assert!(!m.is_stopped());
    }

    #[test]
    fn earliest_start_wins_over_first_completion() {
        // "bc" completes first, but "abcd" started earlier and does complete.
        let (outcomes, rest, stopped) = stop_all(&["abcd", "bc"], &["xabc", "d"]);
        assert_eq!(
            outcomes[0],
            StopOutcome {
                emit: "x".into(),
                stopped: false
            }
        );
        assert_eq!(
            outcomes[1],
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(rest, "");
        assert!(stopped);
        // If the longer one fails, the shorter one still stops the text.
        let (outcomes, _, stopped) = stop_all(&["abcd", "bc"], &["xabc", "e"]);
        assert_eq!(emitted(&outcomes), "xa");
        assert!(outcomes[1].stopped && stopped);
        // And at the end of the stream, flush resolves it.
        let (outcomes, rest, stopped) = stop_all(&["abcd", "bc"], &["xabc"]);
        assert_eq!(emitted(&outcomes) + &rest, "xa");
        assert!(stopped);
    }

    #[test]
    fn overlapping_stops_and_a_stop_that_is_a_suffix_of_another() {
        let (outcomes, rest, stopped) = stop_all(&["aab", "ab"], &["caa", "b"]);
        assert_eq!(emitted(&outcomes) + &rest, "c");
        assert!(stopped);
        let (outcomes, rest, stopped) = stop_all(&["xyz", "yz"], &["wxy", "z"]);
        assert_eq!(emitted(&outcomes) + &rest, "w");
        assert!(stopped);
        let (outcomes, rest, stopped) = stop_all(&["abab"], &["aba", "ba", "b"]);
        assert_eq!(emitted(&outcomes) + &rest, "");
        assert!(stopped);
    }

    #[test]
    fn multibyte_stops_hold_back_whole_characters_only() {
        let mut m = StopMatcher::new(vec!["日本語".into()]);
        let first = m.push("にほん日本");
        assert_eq!(first.emit, "にほん");
        assert_eq!(m.push("人").emit, "日本人");
        // 'è' shares its first byte with 'é' but is a different character: nothing to hold.
        let mut m = StopMatcher::new(vec!["é".into()]);
        assert_eq!(m.push("è").emit, "è");
        let out = m.push("aé");
        assert_eq!(
            out,
            StopOutcome {
                emit: "a".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn flush_after_stop_is_empty_and_reset_rearms() {
        let mut m = StopMatcher::new(vec!["zz".into()]);
        assert!(m.push("azzb").stopped);
        assert_eq!(m.flush(), "");
        m.reset();
        assert!(!m.is_stopped());
        assert_eq!(m.push("q").emit, "q");
    }

    #[test]
    fn splitter_follows_the_think_close_id() {
        let mut s = ReasoningSplitter::new(7, true);
        assert_eq!(s.segment(), Segment::Reasoning);
        assert_eq!(s.classify(1), TokenRole::Text(Segment::Reasoning));
        assert_eq!(s.classify(7), TokenRole::ThinkClose);
        assert_eq!(s.segment(), Segment::Answer);
        assert_eq!(s.classify(1), TokenRole::Text(Segment::Answer));
        assert_eq!(s.classify(7), TokenRole::ThinkClose);
        assert_eq!(s.segment(), Segment::Answer);
        let mut s = ReasoningSplitter::new(7, false);
        assert_eq!(s.classify(1), TokenRole::Text(Segment::Answer));
    }

    #[test]
    fn split_reasoning_uses_the_last_close() {
        assert_eq!(
            split_reasoning("think</think>answer"),
            ("think".into(), "answer".into())
        );
        assert_eq!(
            split_reasoning("a</think>b</think>c"),
            ("a</think>b".into(), "c".into())
        );
        assert_eq!(split_reasoning("</think>"), (String::new(), String::new()));
        assert_eq!(
            split_reasoning("only thoughts"),
            ("only thoughts".into(), String::new())
        );
    }

    #[test]
    fn stream_reasoning_then_answer() {
        let (v, _) = vocab(&[b"Let me think", b".", b"\n\n", b"The answer", b" is 4."]);
        let (stream, events) = stream_all(&v, &[0, 1, CLOSE, 2, 3, 4], &[], true);
        assert_eq!(text_of(&events, Segment::Reasoning), "Let me think.");
        assert_eq!(text_of(&events, Segment::Answer), "\n\nThe answer is 4.");
        assert_eq!(stream.reasoning(), "Let me think.");
        assert_eq!(stream.answer(), "\n\nThe answer is 4.");
        assert_eq!(stopped_count(&events), 0);
        assert!(events
            .iter()
            .all(|e| !matches!(e, StreamEvent::Text { text, .. } if text.is_empty())));
    }

    #[test]
    fn stream_think_close_first_gives_empty_reasoning() {
        let (v, _) = vocab(&[b"Hi"]);
        let (stream, events) = stream_all(&v, &[CLOSE, 0], &[], true);
        assert_eq!(stream.reasoning(), "");
        assert_eq!(stream.answer(), "Hi");
        assert_eq!(
            events,
            [StreamEvent::Text {
                segment: Segment::Answer,
                text: "Hi".into()
            }]
        );
    }

    #[test]
    fn stream_without_think_close_is_all_reasoning() {
        let (v, _) = vocab(&[b"hmm", b" still thinking"]);
        let (stream, events) = stream_all(&v, &[0, 1], &[], true);
        assert_eq!(stream.reasoning(), "hmm still thinking");
        assert_eq!(stream.answer(), "");
        assert_eq!(text_of(&events, Segment::Answer), "");
        assert_eq!(stream.segment(), Segment::Reasoning);
    }

    #[test]
    fn stream_not_starting_in_reasoning_is_all_answer() {
        let (v, _) = vocab(&[b"direct"]);
        let (stream, _) = stream_all(&v, &[0, CLOSE, 0], &[], false);
        assert_eq!(stream.reasoning(), "");
        assert_eq!(stream.answer(), "directdirect");
    }

    #[test]
    fn stream_stray_think_close_in_answer_is_dropped() {
        let (v, _) = vocab(&[b"\xE2\x82", b"\xAC"]);
        let (stream, _) = stream_all(&v, &[CLOSE, 0, CLOSE, 1], &[], true);
        assert_eq!(stream.answer(), "€");
    }

    #[test]
    fn stream_stop_spanning_tokens_never_leaks() {
        let (v, _) = vocab(&[b"The end", b"<|", b"im_", b"end", b"|>", b"junk"]);
        let mut stream = TextStream::new(vec!["<|im_end|>".into()], CLOSE, false);
        let mut events = Vec::new();
        for id in [0, 1, 2, 3, 4, 5, 5] {
            let new = stream.push(&v, id);
            for e in &new {
                if let StreamEvent::Text { text, .. } = e {
                    assert!(!text.contains('<') && !text.contains('|'), "{text:?}");
                }
            }
            events.extend(new);
        }
        assert!(stream.finish(&v).is_empty());
        assert!(stream.is_stopped());
        assert_eq!(stream.answer(), "The end");
        assert_eq!(events.last(), Some(&StreamEvent::Stopped));
        assert_eq!(stopped_count(&events), 1);
    }

    #[test]
    fn stream_stop_made_of_multibyte_characters_split_into_bytes() {
        // "停止" (stop) arrives one byte at a time; neither a half-character nor the stop shows.
        let stop = "停止";
        let mut pieces: Vec<&[u8]> = vec![b"ok "];
        pieces.extend(stop.as_bytes().chunks(1));
        pieces.push(b"after");
        let (v, ids) = vocab(&pieces);
        let (stream, events) = stream_all(&v, &ids, &[stop], false);
        assert_eq!(stream.answer(), "ok ");
        assert_eq!(stopped_count(&events), 1);
        assert!(events.iter().all(|e| match e {
            StreamEvent::Text { text, .. } => !text.contains('\u{FFFD}'),
            StreamEvent::Stopped => true,
        }));
    }

    #[test]
    fn stream_stop_in_reasoning_and_in_answer() {
        let (v, _) = vocab(&[b"think STOP more", b"answer STOP"]);
        let (stream, events) = stream_all(&v, &[0, CLOSE, 1], &["STOP"], true);
        assert_eq!(stream.reasoning(), "think ");
        assert_eq!(stream.answer(), "");
        assert_eq!(stopped_count(&events), 1);
        let (stream, events) = stream_all(&v, &[CLOSE, 1, 0], &["STOP"], true);
        assert_eq!(stream.answer(), "answer ");
        assert_eq!(stopped_count(&events), 1);
    }

    #[test]
    fn stream_stop_does_not_span_think_close() {
        let (v, _) = vocab(&[b"ST", b"OP"]);
        let (stream, events) = stream_all(&v, &[0, CLOSE, 1], &["STOP"], true);
        assert_eq!(stream.reasoning(), "ST");
        assert_eq!(stream.answer(), "OP");
        assert_eq!(stopped_count(&events), 0);
    }

    #[test]
    fn stream_emoji_split_over_four_byte_tokens() {
        let (v, ids) = vocab(&[b"\xF0", b"\x9F", b"\x98", b"\x80"]);
        let mut stream = TextStream::new(Vec::new(), CLOSE, true);
        let per_token: Vec<Vec<StreamEvent>> = ids.iter().map(|&id| stream.push(&v, id)).collect();
        assert!(per_token[..3].iter().all(Vec::is_empty));
        assert_eq!(
            per_token[3],
            [StreamEvent::Text {
                segment: Segment::Reasoning,
                text: "😀".into()
            }]
        );
        assert!(stream.finish(&v).is_empty());
    }

    #[test]
    fn stream_partial_character_before_think_close_is_flushed_as_reasoning() {
        let (v, _) = vocab(&[b"x\xE2\x82", b"\xAC"]);
        let (stream, _) = stream_all(&v, &[0, CLOSE, 1], &[], true);
        assert_eq!(stream.reasoning(), "x\u{FFFD}");
        assert_eq!(stream.answer(), "\u{FFFD}");
    }

    #[test]
    fn stream_held_back_stop_prefix_is_released_at_think_close_and_finish() {
        let (v, _) = vocab(&[b"a<|", b"b<|"]);
        let mut stream = TextStream::new(vec!["<|im_end|>".into()], CLOSE, true);
        assert_eq!(
            stream.push(&v, 0),
            [StreamEvent::Text {
                segment: Segment::Reasoning,
                text: "a".into()
            }]
        );
        assert_eq!(
            stream.push(&v, CLOSE),
            [StreamEvent::Text {
                segment: Segment::Reasoning,
                text: "<|".into()
            }]
        );
        assert_eq!(
            stream.push(&v, 1),
            [StreamEvent::Text {
                segment: Segment::Answer,
                text: "b".into()
            }]
        );
        assert_eq!(
            stream.finish(&v),
            [StreamEvent::Text {
                segment: Segment::Answer,
                text: "<|".into()
            }]
        );
        assert!(!stream.is_stopped());
    }

    #[test]
    fn stream_ignores_pushes_after_stop() {
        let (v, _) = vocab(&[b"xEND", b"more"]);
        let mut stream = TextStream::new(vec!["END".into()], CLOSE, false);
        assert_eq!(
            stream.push(&v, 0),
            [
                StreamEvent::Text {
                    segment: Segment::Answer,
                    text: "x".into()
                },
                StreamEvent::Stopped
            ]
        );
        assert!(stream.push(&v, 1).is_empty());
        assert!(stream.push(&v, CLOSE).is_empty());
        assert!(stream.finish(&v).is_empty());
        assert_eq!(stream.answer(), "x");
    }
}

#[cfg(test)]
mod proptests {
    use super::tests::ByteVocab;
    use super::*;
    use proptest::prelude::*;

    /// Cuts `bytes` into tokens at the given positions (taken modulo the length, so any numbers
    /// work; repeats make empty tokens).
    fn cut_bytes(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
    }

    /// Cuts `text` into chunks at char boundaries near the given positions.
    fn cut_str<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
        let mut at: Vec<usize> = cuts
            .iter()
            .map(|c| {
                let mut i = c % (text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                i
            })
            .collect();
        at.push(0);
        at.push(text.len());
        at.sort_unstable();
        at.windows(2).map(|w| &text[w[0]..w[1]]).collect()
    }

    /// The text up to the earliest occurrence of any non-empty stop string, and whether there is
    /// one: the specification [`StopMatcher`] must meet.
    fn truncate_at_stops(text: &str, stops: &[String]) -> (String, bool) {
        match stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            Some(at) => (text[..at].to_owned(), true),
            None => (text.to_owned(), false),
        }
    }

    /// Longest suffix of `text` (on a char boundary) that is a proper prefix of a stop string.
    fn longest_open_suffix<'a>(text: &'a str, stops: &[String]) -> &'a str {
        (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .map(|i| &text[i..])
            .find(|rest| {
                stops
                    .iter()
                    .any(|s| !rest.is_empty() && s.len() > rest.len() && s.starts_with(rest))
            })
            .unwrap_or("")
    }

    /// Bytes that make every kind of UTF-8 trouble likely: ASCII, continuation bytes, lead bytes
    /// and bytes that are never valid.
    fn troublesome_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            b'a'..=b'c',
            0x80u8..=0xBF,
            0xC2u8..=0xF4,
            Just(0xC0u8),
            Just(0xFFu8),
            any::<u8>(),
        ]
    }

    /// Texts and stop strings share a tiny alphabet, with multi-byte characters, so that stop
    /// strings actually occur and overlap.
    const TEXT: &str = "[abé😀]{0,30}";
    const STOP: &str = "[abé😀]{0,3}";

    proptest! {
        #[test]
        fn text_stream_never_panics_even_with_an_inconsistent_decoder(
            outputs in prop::collection::vec("[aé😀\u{FFFD}<>]{0,4}", 1..16),
            ids in prop::collection::vec(0..12u32, 0..80),
            stops in prop::collection::vec("[aé😀\u{FFFD}<>]{0,3}", 0..=3),
            starts_in_reasoning in any::<bool>(),
        ) {
            // Decodes each window to an unrelated string, so earlier text keeps changing.
            let text = |window: &[u32]| {
                let key = window.len() * 31 + window.iter().map(|&id| id as usize).sum::<usize>();
                outputs[key % outputs.len()].clone()
            };
            let mut stream = TextStream::new(stops, 11, starts_in_reasoning);
            let mut events = Vec::new();
            for &id in &ids {
                events.extend(stream.push(&text, id));
            }
            events.extend(stream.finish(&text));
            let shown: usize = events
                .iter()
                .map(|e| match e {
                    StreamEvent::Text { text, .. } => text.len(),
                    StreamEvent::Stopped => 0,
                })
                .sum();
            prop_assert_eq!(shown, stream.reasoning().len() + stream.answer().len());
        }

        #[test]
        fn decoder_returns_valid_text_split_anywhere_as_soon_as_each_char_is_whole(
            // A literal U+FFFD looks unfinished and may be held back, so it has its own test.
            text in "\\PC{0,24}".prop_map(|s| s.replace(REPLACEMENT, "?")),
            cuts in prop::collection::vec(any::<usize>(), 0..40),
        ) {
            let tokens = cut_bytes(text.as_bytes(), &cuts);
            let ids: Vec<u32> = (0..tokens.len() as u32).collect();
            let vocab = ByteVocab(tokens);
            let mut decoder = IncrementalDecoder::new();
            let mut shown = String::new();
            let mut bytes = Vec::new();
            for &id in &ids {
                shown.push_str(&decoder.push(&vocab, id));
                bytes.extend_from_slice(&vocab.0[id as usize]);
                let whole = match std::str::from_utf8(&bytes) {
                    Ok(s) => s,
                    Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
                };
                prop_assert_eq!(&shown, whole);
            }
            shown.push_str(&decoder.finish(&vocab));
            prop_assert_eq!(shown, text);
        }

        #[test]
        fn decoder_matches_lossy_decoding_of_arbitrary_byte_tokens(
            tokens in prop::collection::vec(prop::collection::vec(troublesome_byte(), 0..5), 0..60),
        ) {
            let ids: Vec<u32> = (0..tokens.len() as u32).collect();
            let vocab = ByteVocab(tokens);
            let full = vocab.decode(&ids);
            let mut decoder = IncrementalDecoder::new();
            let mut shown = String::new();
            for &id in &ids {
                shown.push_str(&decoder.push(&vocab, id));
                // Whatever is shown early must already be final.
                prop_assert!(full.starts_with(&shown), "{:?} not a prefix of {:?}", shown, full);
            }
            shown.push_str(&decoder.finish(&vocab));
            prop_assert_eq!(shown, full);
        }

        #[test]
        fn stop_matcher_cuts_at_the_earliest_stop_whatever_the_chunking(
            text in TEXT,
            stops in prop::collection::vec(STOP, 1..=4),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let (expected, expect_stop) = truncate_at_stops(&text, &stops);
            let mut matcher = StopMatcher::new(stops.clone());
            let mut shown = String::new();
            let mut seen = String::new();
            let mut stopped = false;
            for chunk in cut_str(&text, &cuts) {
                let outcome = matcher.push(chunk);
                prop_assert!(!stopped || outcome.emit.is_empty());
                shown.push_str(&outcome.emit);
                stopped = outcome.stopped;
                seen.push_str(chunk);
                if !stopped && !truncate_at_stops(&seen, &stops).1 {
                    // With no stop string complete, exactly the open suffix is held back.
                    prop_assert_eq!(matcher.held.as_str(), longest_open_suffix(&seen, &stops));
                }
            }
            let rest = matcher.flush();
            prop_assert!(!stopped || rest.is_empty());
            shown.push_str(&rest);
            prop_assert_eq!(shown, expected);
            prop_assert_eq!(matcher.is_stopped(), expect_stop);
        }

        #[test]
        fn text_stream_matches_splitting_then_decoding_then_truncating(
            text in TEXT,
            cuts in prop::collection::vec(any::<usize>(), 0..30),
            closes in prop::collection::vec(any::<usize>(), 0..3),
            stops in prop::collection::vec(STOP, 0..=3),
            starts_in_reasoning in any::<bool>(),
        ) {
            const CLOSE: u32 = u32::MAX;
            let tokens = cut_bytes(text.as_bytes(), &cuts);
            let mut ids: Vec<u32> = (0..tokens.len() as u32).collect();
            for c in &closes {
                ids.insert(c % (ids.len() + 1), CLOSE);
            }
            let vocab = ByteVocab(tokens);

            let first_close = ids.iter().position(|&id| id == CLOSE).filter(|_| starts_in_reasoning);
            let (reasoning_ids, answer_ids) = match first_close {
                Some(at) => (&ids[..at], &ids[at + 1..]),
                None if starts_in_reasoning => (&ids[..], &[][..]),
                None => (&[][..], &ids[..]),
            };
            let answer_ids: Vec<u32> = answer_ids.iter().copied().filter(|&id| id != CLOSE).collect();
            let (want_reasoning, stop_in_reasoning) =
                truncate_at_stops(&vocab.decode(reasoning_ids), &stops);
            let (want_answer, stop_in_answer) = if stop_in_reasoning {
                (String::new(), false)
            } else {
                truncate_at_stops(&vocab.decode(&answer_ids), &stops)
            };

            let mut stream = TextStream::new(stops.clone(), CLOSE, starts_in_reasoning);
            let mut events = Vec::new();
            for &id in &ids {
                events.extend(stream.push(&vocab, id));
            }
            events.extend(stream.finish(&vocab));

            let mut got = (String::new(), String::new());
            for (i, event) in events.iter().enumerate() {
                match event {
                    StreamEvent::Text { segment, text } => {
                        prop_assert!(!text.is_empty());
                        match segment {
                            Segment::Reasoning => {
                                prop_assert!(got.1.is_empty(), "reasoning after answer");
                                got.0.push_str(text);
                            }
                            Segment::Answer => got.1.push_str(text),
                        }
                    }
                    StreamEvent::Stopped => prop_assert_eq!(i, events.len() - 1),
                }
            }
            prop_assert_eq!(&got.0, &want_reasoning);
            prop_assert_eq!(&got.1, &want_answer);
            prop_assert_eq!(stream.reasoning(), want_reasoning.as_str());
            prop_assert_eq!(stream.answer(), want_answer.as_str());
            let stops_seen = events.iter().filter(|e| **e == StreamEvent::Stopped).count();
            prop_assert_eq!(stops_seen, usize::from(stop_in_reasoning || stop_in_answer));
            prop_assert_eq!(stream.is_stopped(), stop_in_reasoning || stop_in_answer);
        }
    }
}
