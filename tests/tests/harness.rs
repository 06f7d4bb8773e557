//! The harness itself, without remocal: if these fail, failures elsewhere say nothing
//! about remocal.

use std::panic::AssertUnwindSafe;

use remocal_tests::bpf::{self, attach_pass_through, tcx_programs};
use remocal_tests::netns;
use remocal_tests::remote::curl_body;
use remocal_tests::scenario::POD_BODY;
use remocal_tests::servers::{self, TcpServer};
use remocal_tests::topology::Topology;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_answer_over_ipv4_and_ipv6_without_remocal() {
    let topology = Topology::new(2);
    let pod_servers: Vec<TcpServer> = topology
        .pods
        .iter()
        .map(|pod| TcpServer::in_netns(&pod.netns, 80, |s| servers::http(s, POD_BODY)))
        .collect();

    for (pod, server) in topology.pods.iter().zip(&pod_servers) {
        for addr in pod.addrs(80) {
            assert_eq!(
                curl_body(&topology.node, addr).await,
                POD_BODY,
                "curl {addr}"
            );
        }
        assert_eq!(server.accepted(), 2);
    }
}

#[test]
fn namespaces_are_removed_even_when_a_test_panics() {
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let topology = Topology::new(1);
        names.push(topology.node.name().to_string());
        names.push(topology.pod(0).netns.name().to_string());
        assert!(names.iter().all(|name| netns::exists(name)));
        panic!("deliberate panic inside a test");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 2);
    for name in names {
        assert!(
            !netns::exists(&name),
            "namespace {name} survived a panicking test"
        );
    }
}

/// The crash-safety tests rely on seeing tcx attachments; prove the query can see one
/// so that "nothing attached" can fail.
#[test]
fn tcx_query_sees_attached_programs() {
    let topology = Topology::new(1);
    let pod = &topology.pod(0).netns;
    assert_eq!(tcx_programs(pod), vec![], "fresh pod has nothing attached");

    let link = attach_pass_through(pod, "eth0", "rmt_selftest");
    let programs = tcx_programs(pod);
    assert_eq!(
        programs,
        vec![bpf::TcxProgram {
            interface: "eth0".into(),
            direction: "ingress",
            name: "rmt_selftest".into(),
        }],
        "found: {}",
        bpf::describe(&programs)
    );

    drop(link);
    assert_eq!(tcx_programs(pod), vec![], "closing the link detaches");
}
