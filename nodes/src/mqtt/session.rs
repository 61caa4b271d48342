//! The life of one MQTT connection as a state machine without I/O: it takes [`Event`]s
//! (a connect answered or failed, the connection lost, a reconnect or a pause asked for, a
//! timer fired, a disconnect done) and returns [`Action`]s (connect, disconnect, wait, get the
//! node ready, publish restored publications again, write a [`Note`] to the activity log).
//! The reconnect schedule of IIB, pausing for back-pressure and the lost-session path are all
//! decided here; [`crate::mqtt::Conn`]'s supervisor only carries the actions out with
//! paho and feeds back what happened. (The shape follows rumqtt's `state.rs`.)

use std::time::Duration;

use flowbus_runtime::config::Config;

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A connect is under way.
    Connecting,
    /// Connected, and the node may use the connection once it is ready.
    Connected,
    /// Disconnecting (to pause or to reconnect).
    Disconnecting,
    /// Waiting before the next connect (after a failure or a lost connection).
    Waiting,
    /// Disconnected on purpose, keeping the session: until a resume.
    Paused,
    /// Given up for good (the client's persistence failed).
    Failed,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The broker accepted a connect.
    Connected {
        /// Whether the broker still had the session.
        session_present: bool,
        /// Publications sent and not acknowledged when the connect started (what the client
        /// drops if the broker has no session).
        unacknowledged: usize,
        /// Of those, the ones restored from the in-flight log at start-up.
        restored: usize,
        /// MQTT v5 CONNACK Maximum QoS, if the broker sent one.
        max_qos: Option<u8>,
    },
    /// A connect failed.
    ConnectFailed {
        /// Why, for the log.
        error: String,
        /// No retry can mend it (the client's persistence failed).
        fatal: bool,
    },
    /// The connection was lost.
    Lost,
    /// A publisher asks to drop the connection and connect again (a missing ack).
    ReconnectAsked,
    /// The node asks to be connected or paused.
    Want(Want),
    /// The timer of the last [`Action::Wait`] fired.
    TimerFired,
    /// The disconnect of the last [`Action::Disconnect`] ended (`Err`: why it failed).
    Disconnected(Result<(), String>),
}

/// Why the connection is dropped on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The node paused (back-pressure): the broker keeps the session's messages.
    Pause,
    /// A publish attempt failed and is retried on a new connection.
    Reconnect,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a connect; its answer comes back as [`Event::Connected`] or
    /// [`Event::ConnectFailed`].
    Connect,
    /// Count the connection open.
    MarkOpen,
    /// Count the connection closed and let nobody use it.
    MarkClosed,
    /// Get the node ready on the new connection (subscribe, probe the broker's QoS), then let
    /// it use the connection.
    Ready {
        /// Whether the broker still had the session.
        session_present: bool,
    },
    /// Publish again the publications restored from the in-flight log, which the client
    /// dropped with the broker's session.
    Republish,
    /// Remember the broker's QoS limit (CONNACK Maximum QoS).
    LearnLimit(u8),
    /// Disconnect, letting the client finish acknowledgements for `grace`; the end comes back
    /// as [`Event::Disconnected`].
    Disconnect {
        /// How long the client may take.
        grace: Duration,
        /// Why.
        reason: Reason,
    },
    /// Start the timer; it comes back as [`Event::TimerFired`].
    Wait(Duration),
    /// Count a failed connection attempt.
    CountFailure,
    /// Stop for good: the flow fails with this reason.
    GiveUp(String),
    /// Write this to the activity log.
    Note(Note),
}

/// What the activity log says about the connection (the supervisor adds the URL and client
/// id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// BIP12063.
    Connected {
        /// Whether the session was resumed.
        session_present: bool,
    },
    /// BIP12114: the client dropped publications in flight with the broker's session.
    Discarded {
        /// How many were in flight.
        unacknowledged: usize,
        /// Of those, restored from the log at start-up (published again now).
        restored: usize,
    },
    /// BIP12113: the broker's QoS limit from its CONNACK.
    BrokerLimit(u8),
    /// BIP12062: lost, reconnecting after `retry_in`.
    Lost {
        /// The wait before the next connect.
        retry_in: Duration,
    },
    /// BIP12092 (warning): disconnected to retry a publish on a new connection.
    DisconnectedToReconnect,
    /// BIP12092: disconnected to pause.
    Paused,
    /// BIP12094: the disconnect to pause failed.
    PauseFailed(String),
    /// BIP12071: the first failure of a series.
    FirstFailure(String),
    /// BIP12096: a failed attempt, retried after `retry_in`.
    Failure {
        /// The attempt, from 1.
        attempt: u32,
        /// Why it failed.
        error: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
    /// BIP12096 (error, not retried): the client's persistence failed.
    Fatal(String),
}

/// How long a pausing client may take to finish the acknowledgements of what it already
/// received, so that the broker does not send those again.
pub const PAUSE_GRACE: Duration = Duration::from_secs(1);

/// The state machine.
#[derive(Debug, Clone)]
pub struct Session {
    backoff: Backoff,
    state: State,
    want: Want,
    /// Failed attempts since the last successful connect.
    failures: u32,
}

impl Session {
    /// A session that has not started: [`start`](Self::start) gives its first actions.
    pub fn new(backoff: Backoff) -> Session {
        Session {
            backoff,
            state: State::Paused,
            want: Want::Up,
            failures: 0,
        }
    }

    /// Where the connection is.
    pub fn state(&self) -> State {
        self.state
    }

    /// What the node asked for last.
    pub fn want(&self) -> Want {
        self.want
    }

    /// The first actions, with what the node wants at the start.
    pub fn start(&mut self, want: Want) -> Vec<Action> {
        self.want = want;
        self.state = State::Paused;
        self.next_connect()
    }

    /// Connect now, unless the node wants to stay paused.
    fn next_connect(&mut self) -> Vec<Action> {
        if self.want == Want::Paused {
            self.state = State::Paused;
            return Vec::new();
        }
        self.state = State::Connecting;
        vec![Action::Connect]
    }

    /// What to do about `event`.
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        use State as S;
        match (self.state, event) {
            (S::Failed, _) => Vec::new(),
            (
                S::Connecting,
                Event::Connected {
                    session_present,
                    unacknowledged,
                    restored,
                    max_qos,
                },
            ) => {
                self.failures = 0;
                self.state = S::Connected;
                let mut out = vec![
                    Action::MarkOpen,
                    Action::Note(Note::Connected { session_present }),
                ];
                if !session_present && unacknowledged > 0 {
                    out.push(Action::Note(Note::Discarded {
                        unacknowledged,
                        restored,
                    }));
                    if restored > 0 {
                        out.push(Action::Republish);
                    }
                }
                if let Some(q) = max_qos {
                    out.push(Action::LearnLimit(q));
                    out.push(Action::Note(Note::BrokerLimit(q)));
                }
                // Subscriptions and the QoS probe happen before the node may use the
                // connection, so a publish never goes out above a limit we could know.
                out.push(Action::Ready { session_present });
                if self.want == Want::Paused {
                    out.extend(self.disconnect(Reason::Pause));
                }
                out
            }
            (S::Connecting, Event::ConnectFailed { error, fatal: true }) => {
                self.state = S::Failed;
                vec![
                    Action::CountFailure,
                    Action::Note(Note::Fatal(error.clone())),
                    Action::GiveUp(error),
                ]
            }
            (
                S::Connecting,
                Event::ConnectFailed {
                    error,
                    fatal: false,
                },
            ) => {
                let retry_in = self.backoff.delay(self.failures);
                let mut out = vec![Action::CountFailure];
                if self.failures == 0 {
                    out.push(Action::Note(Note::FirstFailure(error.clone())));
                }
                self.failures = self.failures.saturating_add(1);
                out.push(Action::Note(Note::Failure {
                    attempt: self.failures,
                    error,
                    retry_in,
                }));
                out.push(Action::Wait(retry_in));
                self.state = S::Waiting;
                out
            }
            (S::Connected, Event::Lost) => {
                let retry_in = self.backoff.delay(0);
                self.state = S::Waiting;
                vec![
                    Action::MarkClosed,
                    Action::Note(Note::Lost { retry_in }),
                    Action::Wait(retry_in),
                ]
            }
            (S::Connected, Event::ReconnectAsked) => self.disconnect(Reason::Reconnect),
            (_, Event::Want(w)) => {
                self.want = w;
                match (self.state, w) {
                    (S::Connected, Want::Paused) => self.disconnect(Reason::Pause),
                    (S::Paused, Want::Up) => self.next_connect(),
                    // Connecting, disconnecting or waiting: decided when that ends.
                    _ => Vec::new(),
                }
            }
            (S::Waiting, Event::TimerFired) => self.next_connect(),
            (S::Disconnecting, Event::Disconnected(result)) => {
                let mut out = Vec::new();
                match (self.want, result) {
                    (Want::Paused, Ok(())) => out.push(Action::Note(Note::Paused)),
                    (Want::Paused, Err(e)) => out.push(Action::Note(Note::PauseFailed(e))),
                    // Dropped to retry a publish: the attempt's reason is the news.
                    (Want::Up, _) => out.push(Action::Note(Note::DisconnectedToReconnect)),
                }
                out.extend(self.next_connect());
                out
            }
            // A lost connection, a reconnect request or a timer from before the current state:
            // stale (a connection-lost callback of a connection already dropped, a publisher
            // that asked while the connection was already going).
            _ => Vec::new(),
        }
    }

    fn disconnect(&mut self, reason: Reason) -> Vec<Action> {
        self.state = State::Disconnecting;
        let grace = match reason {
            Reason::Pause => PAUSE_GRACE,
            // Nothing to finish: the connection is suspect.
            Reason::Reconnect => Duration::ZERO,
        };
        vec![Action::MarkClosed, Action::Disconnect { grace, reason }]
    }
}

/// The reconnect schedule: `initial`, then `step` longer each attempt, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Increase per attempt.
    pub step: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Backoff {
    /// From `[mqtt]` in the configuration.
    pub fn from_config(c: &Config) -> Backoff {
        Backoff {
            initial: c.mqtt.reconnect_initial.0,
            step: c.mqtt.reconnect_step.0,
            max: c.mqtt.reconnect_max.0,
        }
    }

    /// The delay before attempt `n` (counting failed attempts from 0).
    pub fn delay(&self, n: u32) -> Duration {
        (self.initial + self.step.saturating_mul(n)).min(self.max)
    }
}

/// What the supervisor should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Be connected.
    Up,
    /// Stay disconnected (a paused subscriber; the broker keeps the session's messages).
    Paused,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_secs(5),
            step: Duration::from_secs(5),
            max: Duration::from_secs(120),
        }
    }

    fn connected(session_present: bool, unacknowledged: usize, restored: usize) -> Event {
        Event::Connected {
            session_present,
            unacknowledged,
            restored,
            max_qos: None,
        }
    }

    fn failed(e: &str) -> Event {
        Event::ConnectFailed {
            error: e.into(),
            fatal: false,
        }
    }

    fn up() -> Session {
        let mut s = Session::new(backoff());
        assert_eq!(s.start(Want::Up), vec![Action::Connect]);
        s
    }

    fn notes(actions: &[Action]) -> Vec<Note> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Note(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn connects_and_gets_the_node_ready_before_it_may_publish() {
        let mut s = up();
        let a = s.on(connected(false, 0, 0));
        assert_eq!(
            a,
            vec![
                Action::MarkOpen,
                Action::Note(Note::Connected {
                    session_present: false
                }),
                Action::Ready {
                    session_present: false
                },
            ]
        );
        assert_eq!(s.state(), State::Connected);
    }

    #[test]
    fn failures_follow_the_iib_schedule_and_say_first_failure_once() {
        let mut s = up();
        let mut waits = Vec::new();
        for i in 0..30 {
            let a = s.on(failed("refused"));
            assert_eq!(a[0], Action::CountFailure);
            assert_eq!(
                a.contains(&Action::Note(Note::FirstFailure("refused".into()))),
                i == 0
            );
            let Some(Action::Wait(d)) = a.last() else {
                panic!("no wait in {a:?}")
            };
            let Some(Note::Failure { attempt, .. }) = notes(&a).last().cloned() else {
                panic!("no failure note in {a:?}")
            };
            assert_eq!(attempt, i + 1);
            waits.push(d.as_secs());
            assert_eq!(s.on(Event::TimerFired), vec![Action::Connect]);
        }
        assert_eq!(waits[..4], [5, 10, 15, 20]);
        assert_eq!(waits[23..], [120; 7]);
        // A success starts the schedule again.
        s.on(connected(true, 0, 0));
        s.on(Event::Lost);
        s.on(Event::TimerFired);
        let a = s.on(failed("refused"));
        assert!(a.contains(&Action::Note(Note::FirstFailure("refused".into()))));
        assert_eq!(a.last(), Some(&Action::Wait(Duration::from_secs(5))));
    }

    #[test]
    fn a_lost_connection_waits_the_first_delay_and_connects_again() {
        let mut s = up();
        s.on(connected(true, 0, 0));
        let a = s.on(Event::Lost);
        let five = Duration::from_secs(5);
        assert_eq!(
            a,
            vec![
                Action::MarkClosed,
                Action::Note(Note::Lost { retry_in: five }),
                Action::Wait(five)
            ]
        );
        // A second notification of the same loss, and a reconnect asked meanwhile: stale.
        assert!(s.on(Event::Lost).is_empty());
        assert!(s.on(Event::ReconnectAsked).is_empty());
        assert_eq!(s.on(Event::TimerFired), vec![Action::Connect]);
        // Losses and timers that arrive while connecting are stale too.
        assert!(s.on(Event::Lost).is_empty());
        assert!(s.on(Event::TimerFired).is_empty());
        assert_eq!(s.state(), State::Connecting);
    }

    #[test]
    fn a_persistence_failure_gives_up_for_good() {
        let mut s = up();
        let a = s.on(Event::ConnectFailed {
            error: "disk".into(),
            fatal: true,
        });
        assert_eq!(a.last(), Some(&Action::GiveUp("disk".into())));
        assert_eq!(s.state(), State::Failed);
        assert!(s.on(Event::TimerFired).is_empty());
        assert!(s.on(Event::Want(Want::Up)).is_empty());
    }

    #[test]
    fn a_reconnect_for_a_publish_retry_disconnects_at_once_and_connects_again() {
        let mut s = up();
        s.on(connected(true, 0, 0));
        assert_eq!(
            s.on(Event::ReconnectAsked),
            vec![
                Action::MarkClosed,
                Action::Disconnect {
                    grace: Duration::ZERO,
                    reason: Reason::Reconnect
                }
            ]
        );
        assert_eq!(
            s.on(Event::Disconnected(Err("gone".into()))),
            vec![Action::Note(Note::DisconnectedToReconnect), Action::Connect]
        );
    }

    #[test]
    fn pause_and_resume() {
        let mut s = up();
        s.on(connected(true, 0, 0));
        assert_eq!(
            s.on(Event::Want(Want::Paused)),
            vec![
                Action::MarkClosed,
                Action::Disconnect {
                    grace: PAUSE_GRACE,
                    reason: Reason::Pause
                }
            ]
        );
        assert_eq!(
            s.on(Event::Disconnected(Ok(()))),
            vec![Action::Note(Note::Paused)]
        );
        assert_eq!(s.state(), State::Paused);
        // Nothing reconnects a paused connection but a resume.
        assert!(s.on(Event::Lost).is_empty());
        assert!(s.on(Event::ReconnectAsked).is_empty());
        assert!(s.on(Event::TimerFired).is_empty());
        assert!(s.on(Event::Want(Want::Paused)).is_empty());
        assert_eq!(s.on(Event::Want(Want::Up)), vec![Action::Connect]);
        // A failed disconnect is said, and the connection still counts as paused.
        s.on(connected(true, 0, 0));
        s.on(Event::Want(Want::Paused));
        assert_eq!(
            s.on(Event::Disconnected(Err("timeout".into()))),
            vec![Action::Note(Note::PauseFailed("timeout".into()))]
        );
        assert_eq!(s.state(), State::Paused);
    }

    #[test]
    fn a_pause_asked_while_connecting_or_waiting_is_kept_until_that_ends() {
        // While connecting: the node is made ready (its subscriptions are the session's),
        // then the connection pauses at once.
        let mut s = up();
        assert!(s.on(Event::Want(Want::Paused)).is_empty());
        let a = s.on(connected(true, 0, 0));
        assert_eq!(
            a[a.len() - 3..],
            [
                Action::Ready {
                    session_present: true
                },
                Action::MarkClosed,
                Action::Disconnect {
                    grace: PAUSE_GRACE,
                    reason: Reason::Pause
                }
            ]
        );
        // While waiting after a failure: no connect when the timer fires.
        let mut s = up();
        s.on(failed("refused"));
        s.on(Event::Want(Want::Paused));
        assert!(s.on(Event::TimerFired).is_empty());
        assert_eq!(s.state(), State::Paused);
        assert_eq!(s.on(Event::Want(Want::Up)), vec![Action::Connect]);
        // Paused from the start: no connect until a resume.
        let mut s = Session::new(backoff());
        assert!(s.start(Want::Paused).is_empty());
        assert_eq!(s.on(Event::Want(Want::Up)), vec![Action::Connect]);
    }

    #[test]
    fn a_broker_restarted_without_sessions_while_paused_is_said_and_restored_publications_go_again()
    {
        let mut s = up();
        s.on(connected(true, 0, 0));
        s.on(Event::Want(Want::Paused));
        s.on(Event::Disconnected(Ok(())));
        // The broker restarts meanwhile; the paused client does not notice.
        assert!(s.on(Event::Lost).is_empty());
        assert_eq!(s.on(Event::Want(Want::Up)), vec![Action::Connect]);
        let a = s.on(connected(false, 3, 2));
        assert_eq!(
            a,
            vec![
                Action::MarkOpen,
                Action::Note(Note::Connected {
                    session_present: false
                }),
                Action::Note(Note::Discarded {
                    unacknowledged: 3,
                    restored: 2
                }),
                Action::Republish,
                // The node learns the session is gone (a subscriber says what the broker
                // had queued is lost, and subscribes again).
                Action::Ready {
                    session_present: false
                },
            ]
        );
        // With the session kept, nothing was dropped and nothing is published again.
        let mut s = up();
        let a = s.on(connected(true, 3, 2));
        assert!(!a.contains(&Action::Republish));
        assert_eq!(notes(&a).len(), 1);
        // Without a session but with nothing in flight: nothing to say.
        let mut s = up();
        assert!(!s
            .on(connected(false, 0, 0))
            .iter()
            .any(|a| matches!(a, Action::Note(Note::Discarded { .. }))));
    }

    #[test]
    fn a_connack_maximum_qos_is_learnt_before_the_node_is_ready() {
        let mut s = up();
        let a = s.on(Event::Connected {
            session_present: false,
            unacknowledged: 0,
            restored: 0,
            max_qos: Some(1),
        });
        let learn = a.iter().position(|a| *a == Action::LearnLimit(1)).unwrap();
        let ready = a
            .iter()
            .position(|a| matches!(a, Action::Ready { .. }))
            .unwrap();
        assert!(learn < ready);
        assert!(notes(&a).contains(&Note::BrokerLimit(1)));
    }

    #[test]
    fn backoff_follows_the_iib_schedule() {
        let b = Backoff {
            initial: Duration::from_secs(5),
            step: Duration::from_secs(5),
            max: Duration::from_secs(120),
        };
        let d: Vec<u64> = (0..26).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(&d[..4], &[5, 10, 15, 20]);
        assert_eq!(d[22], 115);
        assert_eq!(d[23], 120);
        assert_eq!(d[25], 120);
    }
}
