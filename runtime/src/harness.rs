//! A flow test harness: load a flow, inject messages at an input node, and see what reached
//! each terminal, what was discarded, and what the activity log says — without a broker.
//!
//! ```no_run
//! # async fn demo(registry: flowbus_runtime::Registry) {
//! use flowbus_runtime::harness::Harness;
//! use flowbus_runtime::{Body, Message};
//! let h = Harness::load("tests/flows/enrich/flow.json".as_ref(), &registry).unwrap();
//! h.inject("in", Message::new(Body::Json(serde_json::json!({"t": 21})))).await;
//! let out = h.messages("enrich.Out");
//! # }
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::activity::{Entry, Filter};
use crate::config::Config;
use crate::engine::{Disposition, Flow, Observer};
use crate::flow::{load_flow, FlowErrors};
use crate::message::{Exception, Message};
use crate::node::Registry;
use crate::services::Services;

#[derive(Default)]
struct Capture {
    events: Mutex<Vec<(String, Message)>>,
    discards: Mutex<Vec<(String, Exception)>>,
}

impl Observer for Capture {
    fn on_propagate(&self, node: &str, terminal: &str, msg: &Message) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.push((format!("{node}.{terminal}"), msg.clone()));
    }

    fn on_discard(&self, node: &str, exception: &Exception) {
        let mut d = self.discards.lock().unwrap_or_else(|p| p.into_inner());
        d.push((node.to_string(), exception.clone()));
    }
}

/// A flow loaded for testing.
pub struct Harness {
    flow: Flow,
    capture: Arc<Capture>,
    services: Arc<Services>,
}

impl Harness {
    /// Loads a flow with the default configuration.
    pub fn load(path: &Path, registry: &Registry) -> Result<Harness, FlowErrors> {
        Harness::load_with(path, registry, Config::default())
    }

    /// Loads a flow with the given configuration.
    pub fn load_with(
        path: &Path,
        registry: &Registry,
        config: Config,
    ) -> Result<Harness, FlowErrors> {
        let services = Arc::new(Services::from_config(&config));
        let mut flow = load_flow(path, registry, Arc::new(config), services.clone())?;
        let capture = Arc::new(Capture::default());
        flow.set_observer(capture.clone());
        Ok(Harness {
            flow,
            capture,
            services,
        })
    }

    /// The flow.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// Sends a message out of input node `node` (as if it had received it) and waits until
    /// its propagation has finished.
    pub async fn inject(&self, node: &str, msg: Message) -> Disposition {
        match self.flow.input_ctx(node) {
            Some(ctx) => ctx.dispatch(msg).await,
            None => panic!(
                "'{node}' is not an input node of flow '{}'",
                self.flow.name()
            ),
        }
    }

    /// Every propagation so far, in order, as `("node.Terminal", message)`.
    pub fn events(&self) -> Vec<(String, Message)> {
        self.capture
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The messages that left `node.Terminal`, in order.
    pub fn messages(&self, terminal: &str) -> Vec<Message> {
        self.events()
            .into_iter()
            .filter(|(t, _)| t == terminal)
            .map(|(_, m)| m)
            .collect()
    }

    /// The exceptions that nothing caught (the message was discarded), with the input node.
    pub fn discards(&self) -> Vec<(String, Exception)> {
        self.capture
            .discards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The activity log of this harness.
    pub fn activity(&self) -> Vec<Arc<Entry>> {
        self.services.activity.query(&Filter::default())
    }

    /// Forgets what was captured so far.
    pub fn clear(&self) {
        self.capture
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.capture
            .discards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
