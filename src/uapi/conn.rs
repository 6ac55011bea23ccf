//! One UAPI connection: bytes in any split → lines → operations applied to a
//! [`Device`] → [`Event`]s the shell answers.

use super::UapiError;
use super::device::{Current, Device};

/// Longest line kept (the longest valid line is under 100 bytes). A longer one ends
/// the connection with `errno=-EPROTO`.
pub const MAX_LINE: usize = 4096;

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A `get=1` request: answer with [`super::render_get`] and `errno=0`.
    Get,
    /// A `set=1` request ended (a blank line or the end of input): apply the
    /// device's changes, then answer `errno=` with the result (the lines before an
    /// error stay applied).
    Set(Result<(), UapiError>),
    /// Answer `errno=` with this error and close (an overlong line).
    Fail(UapiError),
    /// Close without an answer (an unknown operation, as wireguard-go does).
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for `get=1` or `set=1`.
    Op,
    /// After `get=1`: the blank line.
    Get,
    /// Inside a `set`: lines apply to `Current`.
    Set(Current),
    /// An operation failed: skip to its blank line, then answer.
    Skip {
        set: bool,
        error: UapiError,
    },
    Closed,
}

/// A connection's parser. See the [module docs](self).
#[derive(Debug)]
pub struct Conn {
    /// Bytes of a line not yet complete (at most [`MAX_LINE`]).
    partial: Vec<u8>,
    state: State,
}

impl Default for Conn {
    fn default() -> Self {
        Self::new()
    }
}

impl Conn {
    pub fn new() -> Self {
        Conn {
            partial: Vec::new(),
            state: State::Op,
        }
    }

    /// The connection is done: close it after answering the events given.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Takes bytes read from the socket; applies complete `set` lines to `dev` and
    /// pushes what to answer onto `events`.
    pub fn handle_input(&mut self, mut data: &[u8], dev: &mut Device, events: &mut Vec<Event>) {
        while !data.is_empty() && !self.is_closed() {
            let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                if self.partial.len() + data.len() > MAX_LINE {
                    self.fail(events);
                } else {
                    self.partial.extend_from_slice(data);
                }
                return;
            };
            let (head, rest) = data.split_at(nl);
            data = rest.get(1..).unwrap_or_default();
            if self.partial.is_empty() {
                if head.len() > MAX_LINE {
                    self.fail(events);
                    return;
                }
                self.line(head, dev, events);
            } else {
                if self.partial.len() + head.len() > MAX_LINE {
                    self.fail(events);
                    return;
                }
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line, dev, events);
                line.clear();
                self.partial = line;
            }
        }
    }

    /// The peer closed its side: a `set` without its blank line still ends (and is
    /// answered) as in wireguard-go; anything else just closes.
    pub fn handle_eof(&mut self, dev: &mut Device, events: &mut Vec<Event>) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, dev, events);
        }
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Set(_) => events.push(Event::Set(Ok(()))),
            State::Skip { set: true, error } => events.push(Event::Set(Err(error))),
            _ => {}
        }
    }

    fn fail(&mut self, events: &mut Vec<Event>) {
        self.partial.clear();
        self.state = State::Closed;
        events.push(Event::Fail(UapiError::Protocol(format!(
            "line longer than {MAX_LINE} bytes"
        ))));
    }

    fn line(&mut self, line: &[u8], dev: &mut Device, events: &mut Vec<Event>) {
        let text = std::str::from_utf8(line);
        match &mut self.state {
            State::Op => {
                self.state = match text {
                    Ok("get=1") => State::Get,
                    Ok("set=1") => State::Set(Current::Device),
                    _ => {
                        events.push(Event::Close);
                        State::Closed
                    }
                };
            }
            State::Get => {
                if line.is_empty() {
                    events.push(Event::Get);
                    self.state = State::Op;
                } else {
                    self.state = State::Skip {
                        set: false,
                        error: UapiError::Invalid {
                            key: "get",
                            value: "trailing line".into(),
                        },
                    };
                }
            }
            State::Set(current) => {
                if line.is_empty() {
                    events.push(Event::Set(Ok(())));
                    self.state = State::Op;
                    return;
                }
                let result = match text {
                    Err(_) => Err(UapiError::Protocol("not UTF-8".into())),
                    Ok(t) => match t.split_once('=') {
                        None => Err(UapiError::Protocol(format!(
                            "no '=' in {:?}",
                            t.chars().take(80).collect::<String>()
                        ))),
                        Some((k, v)) => dev.apply(current, k, v),
                    },
                };
                if let Err(error) = result {
                    self.state = State::Skip { set: true, error };
                }
            }
            State::Skip { set, error } => {
                if line.is_empty() {
                    let error = error.clone();
                    events.push(if *set {
                        Event::Set(Err(error))
                    } else {
                        Event::Fail(error)
                    });
                    self.state = if *set { State::Op } else { State::Closed };
                }
            }
            State::Closed => {}
        }
    }
}
