//! The registry's JSON shapes, shared by the server and its client (camelCase on the
//! wire, times in milliseconds since the Unix epoch, intervals in seconds).

use serde::{Deserialize, Serialize};

/// Body of `POST /register` and `POST /heartbeat` (camelCase on the wire).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// Service name, lowercase `[a-z0-9-]`, 1 to 63 characters.
    pub name: String,
    /// The port the instance listens on.
    pub port: u16,
    /// Seconds between heartbeats; the registry defaults it to 30.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval: Option<u64>,
    /// Address other services reach the instance at; the registry defaults it to the
    /// caller's IP address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Free-form facts about the instance (version, zone, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl RegisterRequest {
    /// A request for `name` on `port` with every optional field left to the registry.
    pub fn new(name: impl Into<String>, port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            heartbeat_interval: None,
            host: None,
            metadata: None,
        }
    }
}

/// Answer to `POST /register`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    /// `"<name>-<host>-<port>"`.
    pub id: String,
    /// The interval the registry applies, in seconds.
    pub heartbeat_interval: u64,
    /// When this registration happened (ms since the epoch).
    pub registered_at: u64,
}

/// Answer to `POST /heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    /// Always `true` on a 200.
    pub ok: bool,
    /// When this heartbeat was recorded (ms since the epoch).
    pub last_heartbeat: u64,
    /// Seconds until the next heartbeat is due.
    pub next_heartbeat_in: u64,
}

/// One registered instance as the registry returns it (times: ms since epoch).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// `"<name>-<host>-<port>"`.
    pub id: String,
    /// Service name.
    pub name: String,
    /// Host or IP address the instance is reached at.
    pub host: String,
    /// Port the instance listens on.
    pub port: u16,
    /// Seconds between heartbeats.
    pub heartbeat_interval: u64,
    /// When the instance last registered (ms since the epoch).
    pub registered_at: u64,
    /// When its last heartbeat arrived (ms since the epoch).
    pub last_heartbeat: u64,
    /// `"healthy"`: the registry only returns live instances.
    pub status: String,
    /// Free-form facts the instance registered with.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl Instance {
    /// `"http://host:port"` (IPv6 hosts bracketed).
    pub fn base_url(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

/// Answer to `GET /services/:name`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceList {
    /// The live instances of the service, possibly none.
    pub services: Vec<Instance>,
}

/// Answer to `DELETE /services/:name/:port`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemovedResponse {
    /// `"Service removed successfully"`.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(host: &str) -> Instance {
        Instance {
            id: format!("svc-{host}-4000"),
            name: "svc".into(),
            host: host.into(),
            port: 4000,
            heartbeat_interval: 30,
            registered_at: 1,
            last_heartbeat: 2,
            status: "healthy".into(),
            metadata: serde_json::Map::new(),
        }
    }

    #[test]
    fn base_url_brackets_ipv6_only() {
        assert_eq!(instance("127.0.0.1").base_url(), "http://127.0.0.1:4000");
        assert_eq!(
            instance("users.internal").base_url(),
            "http://users.internal:4000"
        );
        assert_eq!(instance("::1").base_url(), "http://[::1]:4000");
        assert_eq!(instance("[::1]").base_url(), "http://[::1]:4000");
    }

    #[test]
    fn register_request_is_camel_case_and_skips_absent_fields() {
        let mut req = RegisterRequest::new("user-service", 4000);
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            serde_json::json!({"name": "user-service", "port": 4000})
        );
        req.heartbeat_interval = Some(5);
        req.host = Some("10.0.0.1".into());
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["heartbeatInterval"], 5);
        assert_eq!(v["host"], "10.0.0.1");
        assert_eq!(serde_json::from_value::<RegisterRequest>(v).unwrap(), req);
    }

    #[test]
    fn instance_without_metadata_decodes() {
        let v = serde_json::json!({
            "id": "a-h-1", "name": "a", "host": "h", "port": 1, "heartbeatInterval": 30,
            "registeredAt": 1, "lastHeartbeat": 2, "status": "healthy"
        });
        let i: Instance = serde_json::from_value(v).unwrap();
        assert!(i.metadata.is_empty());
        assert_eq!(i.last_heartbeat, 2);
    }
}
