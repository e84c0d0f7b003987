//! A DNS server on a free loopback UDP port for discovery tests: answers A, AAAA and SRV
//! queries from a table the test changes while weir runs, with the TTLs the test sets; while
//! `fail` is set it answers SERVFAIL. Built on the hickory wire format (the resolver's own
//! crate), so what weir receives is real DNS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Zone {
    records: HashMap<(String, RecordType), Vec<Record>>,
    fail: bool,
    queries: usize,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: JoinHandle<()>,
}

fn key(name: &str) -> String {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    format!("{n}.")
}

fn name(n: &str) -> Name {
    Name::from_ascii(key(n)).expect("a DNS name")
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = socket.local_addr().expect("addr");
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let z = zone.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::response(query.metadata.id, OpCode::Query);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.authoritative = true;
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                reply.metadata.recursion_available = true;
                {
                    let mut zone = z.lock().unwrap_or_else(|p| p.into_inner());
                    zone.queries += 1;
                    for q in &query.queries {
                        reply.add_query(q.clone());
                        if zone.fail {
                            continue;
                        }
                        let name = key(&q.name().to_ascii());
                        if let Some(rs) = zone.records.get(&(name.clone(), q.query_type())) {
                            reply.add_answers(rs.iter().cloned());
                        }
                        // A name with records of other types only: NOERROR, no data.
                        if !zone
                            .records
                            .iter()
                            .any(|((n, _), rs)| *n == name && !rs.is_empty())
                        {
                            reply.metadata.response_code = ResponseCode::NXDomain;
                        }
                    }
                    if zone.fail {
                        reply.metadata.response_code = ResponseCode::ServFail;
                    }
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        DnsServer { addr, zone, task }
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `host`'s A/AAAA records become `ips`, with `ttl` seconds.
    pub fn set_addresses(&self, host: &str, ips: &[IpAddr], ttl: u32) {
        let mut z = self.zone();
        let (v4, v6): (Vec<_>, Vec<_>) = ips.iter().partition(|ip| ip.is_ipv4());
        let rec = |ip: &IpAddr| {
            let data = match ip {
                IpAddr::V4(a) => RData::A(A(*a)),
                IpAddr::V6(a) => RData::AAAA(AAAA(*a)),
            };
            Record::from_rdata(name(host), ttl, data)
        };
        z.records
            .insert((key(host), RecordType::A), v4.iter().map(&rec).collect());
        z.records
            .insert((key(host), RecordType::AAAA), v6.iter().map(rec).collect());
    }

    /// `srv`'s SRV records become `targets` (target host, port, weight), with `ttl` seconds.
    pub fn set_srv(&self, srv: &str, targets: &[(&str, u16, u16)], ttl: u32) {
        let records = targets
            .iter()
            .map(|(t, port, weight)| {
                Record::from_rdata(
                    name(srv),
                    ttl,
                    RData::SRV(SRV::new(10, *weight, *port, name(t))),
                )
            })
            .collect();
        self.zone()
            .records
            .insert((key(srv), RecordType::SRV), records);
    }

    /// While set, every answer is SERVFAIL.
    pub fn set_failing(&self, fail: bool) {
        self.zone().fail = fail;
    }

    /// Queries answered so far.
    pub fn queries(&self) -> usize {
        self.zone().queries
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
