//! Text that others wrote, made fit to show.

/// One line of `text` made safe for a terminal: every control character
/// (newlines too) and every bidirectional override is shown as U+FFFD.
/// Peers write some of what spare prints (a host's refusal, a failure it
/// reports, a peer's agent string): an escape sequence could rewrite the
/// user's screen, a newline add a line spare did not write, an override
/// reverse what follows.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\t')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    if text.contains(unsafe_char) {
        text.replace(unsafe_char, "\u{fffd}").into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_peers_do_not_reach_the_terminal() {
        assert_eq!(
            printable("plain, with a tab\tin it"),
            "plain, with a tab\tin it"
        );
        assert_eq!(
            printable("one\nspare: done \u{202e}txt.exe"),
            "one\u{fffd}spare: done \u{fffd}txt.exe"
        );
        assert_eq!(
            printable("\u{1b}]0;owned\u{7}red \u{1b}[31mtext\u{9b}2J\r"),
            "\u{fffd}]0;owned\u{fffd}red \u{fffd}[31mtext\u{fffd}2J\u{fffd}"
        );
    }
}
