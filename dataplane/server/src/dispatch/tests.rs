//! Unit tests of the dispatcher.

use super::*;
use devplane_devmodels::counter::Counter;
use devplane_wire::{AccessSize, Request, RequestId, datagram};

fn req(seq: u64, access: Access) -> Record {
    Record::Request(Request {
        id: RequestId {
            vm: 3,
            hypervisor: 2,
            vcpu: 1,
            seq,
        },
        access,
        flags: 0,
    })
}

fn encode(model: u32, recs: &[Record]) -> Vec<u8> {
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(&mut buf, Header::new(Kind::Request, model, 9, 7), recs).unwrap();
    buf.truncate(n);
    buf
}

fn dispatcher() -> Dispatcher {
    let mut d = Dispatcher::new(1);
    let mut slot = ModelSlot::new(Box::new(Counter::new(5)), 0x100, 0xd000_0000);
    slot.irq_target = Some((3, 2));
    d.insert(42, slot);
    d
}

#[test]
fn applies_in_order_and_answers_in_place() {
    let mut d = dispatcher();
    let w = Access::PioOut {
        port: 0x100,
        size: AccessSize::B1,
        data: 5,
    };
    let r = Access::PioIn {
        port: 0x100,
        size: AccessSize::B4,
    };
    let mr = Access::MmioRead {
        gpa: 0xd000_0008,
        size: AccessSize::B8,
    };
    let mut buf = encode(42, &[req(1, w), req(2, w), req(3, r), req(4, mr)]);
    let len = buf.len();
    assert_eq!(
        d.handle(&mut buf),
        Outcome::Respond {
            records: 4,
            client: 7,
            vm: 3,
            irq_port: None,
            fresh: true,
        }
    );
    assert_eq!(buf.len(), len);
    let rsp = Datagram::parse(&buf).unwrap();
    assert_eq!(rsp.kind(), Kind::Response);
    assert_eq!((rsp.model(), rsp.server(), rsp.client()), (42, 1, 7));
    let got: Vec<(u64, Status, u64)> = rsp
        .records()
        .map(|r| match r {
            Record::Response(r) => (r.id.seq, r.status, r.data),
            other => panic!("{other:?}"),
        })
        .collect();
    // The read after two writes sees both; the MMIO read sees the sum.
    assert_eq!(
        got,
        vec![
            (1, Status::Ok, 0),
            (2, Status::Ok, 0),
            (3, Status::Ok, 2),
            (4, Status::Ok, 10)
        ]
    );
    let s = d.stats();
    assert_eq!((s.datagrams, s.records, s.reads, s.writes), (1, 4, 2, 2));
}

#[test]
fn unknown_model_and_model_errors_get_statuses() {
    let mut d = dispatcher();
    let r = Access::PioIn {
        port: 0x103,
        size: AccessSize::B1,
    };
    let mut buf = encode(42, &[req(1, r)]);
    d.handle(&mut buf);
    match Datagram::parse(&buf).unwrap().records().next() {
        Some(Record::Response(r)) => assert_eq!(r.status, Status::Unmapped),
        other => panic!("{other:?}"),
    }
    let mut buf = encode(43, &[req(2, r)]);
    assert_eq!(d.handle(&mut buf), Outcome::NotHere, "not answered");
    assert_eq!(d.stats().no_such_model, 1);
    assert_eq!(d.stats().model_errors, 1);
}

#[test]
fn malformed_is_counted_and_left_alone() {
    let mut d = dispatcher();
    let w = Access::PioOut {
        port: 0x100,
        size: AccessSize::B1,
        data: 5,
    };
    let mut buf = encode(42, &[req(1, w)]);
    buf[devplane_wire::HEADER_LEN + 1] = 3; // size 3
    let before = buf.clone();
    assert!(matches!(d.handle(&mut buf), Outcome::Malformed(_)));
    assert_eq!(buf, before);
    assert_eq!(d.stats().malformed, 1);
    assert_eq!(
        d.stats().writes,
        0,
        "a malformed datagram reached the model"
    );
    // A response datagram sent to a server is malformed for it.
    let mut ok = encode(42, &[req(1, w)]);
    d.handle(&mut ok);
    assert!(matches!(d.handle(&mut ok), Outcome::Malformed(_)));
}

#[test]
fn a_retransmitted_write_is_applied_once_and_answered_again() {
    let mut d = dispatcher();
    let w = Access::PioOut {
        port: 0x100,
        size: AccessSize::B1,
        data: 5,
    };
    let r = Access::PioIn {
        port: 0x100,
        size: AccessSize::B4,
    };
    let first = encode(42, &[req(1, w), req(2, r)]);
    let mut a = first.clone();
    d.handle(&mut a);
    let mut b = first.clone();
    d.handle(&mut b);
    assert_eq!(a, b, "the repeat got a different answer");
    let mut c = encode(42, &[req(3, r)]);
    d.handle(&mut c);
    match Datagram::parse(&c).unwrap().records().next() {
        Some(Record::Response(r)) => assert_eq!(r.data, 1, "write applied twice"),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.stats().duplicates, 2);
    // Push seq 1 out of the window: a repeat of it is now stale.
    for seq in 4..(WINDOW as u64 + 10) {
        let mut x = encode(42, &[req(seq, r)]);
        d.handle(&mut x);
    }
    let mut old = encode(42, &[req(1, w)]);
    d.handle(&mut old);
    match Datagram::parse(&old).unwrap().records().next() {
        Some(Record::Response(r)) => assert_eq!(r.status, Status::Stale),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        d.model(42).unwrap().model.snapshot().data[..8],
        1u64.to_le_bytes()
    );
}

#[test]
fn a_moved_model_keeps_its_state_and_windows() {
    let mut a = dispatcher();
    let mut b = Dispatcher::new(1);
    let w = Access::PioOut {
        port: 0x100,
        size: AccessSize::B1,
        data: 5,
    };
    let r = Access::PioIn {
        port: 0x100,
        size: AccessSize::B4,
    };
    let mut first = encode(42, &[req(1, w), req(2, w)]);
    a.handle(&mut first);
    let h = a.release(42).expect("owned");
    assert!(a.model(42).is_none());
    let mut lost = encode(42, &[req(3, w)]);
    assert_eq!(a.handle(&mut lost), Outcome::NotHere);
    b.adopt(42, h).unwrap();
    // The repeat of seq 2 (answer lost during the move) is not applied
    // again; seq 3 is new.
    let mut again = encode(42, &[req(2, w), req(3, w), req(4, r)]);
    b.handle(&mut again);
    let data: Vec<u64> = Datagram::parse(&again)
        .unwrap()
        .records()
        .map(|r| match r {
            Record::Response(r) => r.data,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(data, vec![0, 0, 3], "writes: 1, 2 before the move, 3 after");
    assert_eq!(b.stats().duplicates, 1);
    assert_eq!(b.model(42).unwrap().irq_target, Some((3, 2)));
}

/// The data of each response record in `buf`.
fn answers(buf: &[u8]) -> Vec<u64> {
    Datagram::parse(buf)
        .unwrap()
        .records()
        .map(|r| match r {
            Record::Response(r) => r.data,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_lent_model_is_not_served_until_settled() {
    let w = Access::PioOut {
        port: 0x100,
        size: AccessSize::B1,
        data: 5,
    };
    let r = Access::PioIn {
        port: 0x100,
        size: AccessSize::B4,
    };
    // Cancelled: the old owner takes it back as it was, with its
    // interrupts.
    let mut a = dispatcher();
    a.handle(&mut encode(42, &[req(1, w)]));
    let irq = PendingIrq {
        model: 42,
        vm: 3,
        hypervisor: 2,
        event: IrqEvent {
            line: 5,
            action: devplane_wire::IrqAction::Edge,
        },
        seq: 9,
    };
    let h = a.lend(42, &[irq]).expect("owned");
    assert_eq!(h.irqs, vec![irq]);
    assert_eq!(a.lent_ids().collect::<Vec<_>>(), vec![42]);
    assert_eq!(a.handle(&mut encode(42, &[req(2, w)])), Outcome::NotHere);
    assert_eq!(
        a.lend(42, &[]).err(),
        Some(LendError::NotHere),
        "lent twice"
    );
    assert_eq!(a.settle(42, true), Some(vec![irq]));
    let mut buf = encode(42, &[req(2, w), req(3, r)]);
    a.handle(&mut buf);
    assert_eq!(answers(&buf), vec![0, 2], "the write before lending kept");
    assert_eq!(a.settle(42, true), None, "nothing lent any more");
    // Moved: the new owner serves the hand-over, the old drops its copy.
    let h = a.lend(42, &[]).expect("owned");
    let mut b = Dispatcher::new(1);
    b.adopt(42, h).unwrap();
    assert_eq!(a.settle(42, false), Some(vec![]));
    assert!(a.model(42).is_none() && a.lent_ids().next().is_none());
    let mut buf = encode(42, &[req(3, r)]);
    b.handle(&mut buf);
    assert_eq!(answers(&buf), vec![2]);
}

#[test]
fn interrupts_are_addressed_to_the_models_vm() {
    let mut d = dispatcher();
    let raise = Access::PioOut {
        port: 0x110,
        size: AccessSize::B1,
        data: 2,
    };
    let mut buf = encode(42, &[req(1, raise)]);
    d.handle(&mut buf);
    let irqs: Vec<PendingIrq> = d.drain_irqs().collect();
    assert_eq!(irqs.len(), 2);
    assert_eq!(
        (irqs[0].vm, irqs[0].hypervisor, irqs[0].event.line),
        (3, 2, 5)
    );
    // Numbered on from where the model started (the wall clock when it
    // was built, above any predecessor's), one by one.
    let start = d.model(42).unwrap().irq_seq - 2;
    assert!(
        start >= devplane_wire::first_seq() - 60_000_000_000,
        "a recent start"
    );
    assert_eq!((irqs[0].seq, irqs[1].seq), (start + 1, start + 2));
    assert!(!d.has_irqs());
}

/// An acknowledgement names the model and the highest interrupt it
/// covers; nothing is sent back.
#[test]
fn acknowledgements_are_handed_to_the_router() {
    let mut d = dispatcher();
    let ack = |seq| {
        Record::Ack(devplane_wire::Ack {
            id: RequestId {
                vm: 3,
                hypervisor: 2,
                vcpu: 0,
                seq,
            },
        })
    };
    let mut buf = vec![0u8; 256];
    let n = devplane_wire::datagram::encode(
        &mut buf,
        Header::new(Kind::Ack, 42, 1, 7),
        &[ack(5), ack(9), ack(7)],
    )
    .unwrap();
    assert!(
        matches!(
            d.handle(&mut buf[..n]),
            Outcome::Acked {
                model: 42,
                seq: 9,
                client: 7,
                irq_port: None,
                ..
            }
        ),
        "the highest acknowledged"
    );
    assert_eq!(d.stats().acks, 1);
}

/// A dispatcher that checks ownership: VM 3 is client 7's, VM 4 client
/// 8's.
fn checking() -> Dispatcher {
    let mut d = dispatcher();
    d.set_owners(Owners {
        by_vm: [(3, 7), (4, 8)].into_iter().collect(),
        check: true,
    });
    d
}

fn req_for(vm: u32, vcpu: u16, seq: u64, access: Access) -> Record {
    Record::Request(Request {
        id: RequestId {
            vm,
            hypervisor: 2,
            vcpu,
            seq,
        },
        access,
        flags: 0,
    })
}

fn encode_from(client: u32, model: u32, recs: &[Record]) -> Vec<u8> {
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(&mut buf, Header::new(Kind::Request, model, 9, client), recs).unwrap();
    buf.truncate(n);
    buf
}

fn statuses(buf: &[u8]) -> Vec<(Status, u64)> {
    Datagram::parse(buf)
        .unwrap()
        .records()
        .map(|r| match r {
            Record::Response(r) => (r.status, r.data),
            other => panic!("{other:?}"),
        })
        .collect()
}

const WRITE: Access = Access::PioOut {
    port: 0x100,
    size: AccessSize::B1,
    data: 5,
};
const READ: Access = Access::PioIn {
    port: 0x100,
    size: AccessSize::B4,
};

/// The cross-tenant write loss of issue 13: client 8 pre-answers and
/// pushes client 7's window with numbers near 2^64. Every such datagram
/// is dropped (even one with a single foreign record among its own), and
/// client 7's writes are applied and answered as before.
#[test]
fn another_clients_vm_is_never_touched() {
    let mut d = checking();
    for seq in (u64::MAX - 300)..u64::MAX {
        let mut b = encode_from(8, 42, &[req_for(3, 0, seq, WRITE)]);
        assert_eq!(d.handle(&mut b), Outcome::Foreign);
    }
    let mut mixed = encode_from(8, 42, &[req_for(4, 0, 1, WRITE), req_for(3, 0, 2, WRITE)]);
    assert_eq!(d.handle(&mut mixed), Outcome::Foreign);
    let mut unknown = encode_from(7, 42, &[req_for(99, 0, 1, WRITE)]);
    assert_eq!(d.handle(&mut unknown), Outcome::Foreign);
    assert_eq!(d.stats().foreign_vm, 302);
    assert_eq!(d.stats().writes, 0, "a foreign write reached the model");
    let mut own = encode_from(7, 42, &[req_for(3, 0, 2, WRITE), req_for(3, 0, 3, READ)]);
    assert!(matches!(d.handle(&mut own), Outcome::Respond { .. }));
    assert_eq!(statuses(&own), vec![(Status::Ok, 0), (Status::Ok, 1)]);
    assert_eq!(d.window_count(), 1, "windows only for the owner's vCPU");
}

/// Windows are keyed by client too: after a VM migrates, its new client's
/// numbers do not meet the old client's answers.
#[test]
fn windows_are_per_client() {
    let mut d = checking();
    let mut a = encode_from(7, 42, &[req_for(3, 0, 10, WRITE)]);
    d.handle(&mut a);
    d.migrate(3, 8);
    let mut b = encode_from(8, 42, &[req_for(3, 0, 10, WRITE), req_for(3, 0, 11, READ)]);
    d.handle(&mut b);
    assert_eq!(
        statuses(&b),
        vec![(Status::Ok, 0), (Status::Ok, 2)],
        "the new client's seq 10 is its own, applied"
    );
    let mut old = encode_from(7, 42, &[req_for(3, 0, 12, WRITE)]);
    assert_eq!(d.handle(&mut old), Outcome::Foreign, "no longer client 7's");
}

/// A number far ahead of a window is refused, not adopted: the numbers
/// after it are still applied (before, it pushed them out as stale).
#[test]
fn a_number_far_ahead_is_refused() {
    let mut d = checking();
    let mut a = encode_from(7, 42, &[req_for(3, 0, 100, WRITE)]);
    d.handle(&mut a);
    let mut far = encode_from(7, 42, &[req_for(3, 0, u64::MAX - 1, WRITE)]);
    d.handle(&mut far);
    assert_eq!(statuses(&far), vec![(Status::Stale, 0)]);
    assert_eq!(d.stats().far_ahead, 1);
    let mut next = encode_from(
        7,
        42,
        &[req_for(3, 0, 101, WRITE), req_for(3, 0, 102, READ)],
    );
    d.handle(&mut next);
    assert_eq!(statuses(&next), vec![(Status::Ok, 0), (Status::Ok, 2)]);
    // Within the in-flight limit ahead is fine.
    let mut ahead = encode_from(7, 42, &[req_for(3, 0, 102 + WINDOW as u64, READ)]);
    d.handle(&mut ahead);
    assert_eq!(statuses(&ahead), vec![(Status::Ok, 2)]);
    // A restarted client numbers from the wall clock: a gap, not an
    // attack; and the window keeps what it had, so a late repeat of 101
    // is answered from it, not applied again.
    let restart = devplane_wire::first_seq();
    let mut fresh = encode_from(7, 42, &[req_for(3, 0, restart, READ)]);
    d.handle(&mut fresh);
    assert_eq!(statuses(&fresh), vec![(Status::Ok, 2)]);
    let mut late = encode_from(7, 42, &[req_for(3, 0, 101, WRITE)]);
    d.handle(&mut late);
    assert_eq!(statuses(&late), vec![(Status::Ok, 0)]);
    assert_eq!(d.stats().writes, 2, "the late repeat was applied again");
    assert_eq!(d.stats().far_ahead, 1);
}

/// Windows are bounded per VM: vCPU ids beyond the limit are refused and
/// counted, and the memory they would take is never allocated.
#[test]
fn windows_are_bounded_per_vm() {
    let mut d = checking();
    for vcpu in 0..(MAX_VCPU_WINDOWS as u16 + 44) {
        let mut b = encode_from(7, 42, &[req_for(3, vcpu, 1, READ)]);
        d.handle(&mut b);
    }
    assert_eq!(d.window_count(), MAX_VCPU_WINDOWS as usize);
    assert_eq!(d.stats().window_limit, 44);
    // Another VM has its own allowance.
    let mut b = encode_from(8, 42, &[req_for(4, 0, 1, READ)]);
    d.handle(&mut b);
    assert_eq!(statuses(&b), vec![(Status::Ok, 0)]);
    assert_eq!(d.window_count(), MAX_VCPU_WINDOWS as usize + 1);
}

/// Interrupt acknowledgements count only from the client of the VM the
/// model interrupts.
#[test]
fn acks_from_another_client_are_ignored() {
    let mut d = checking();
    let ack = |client: u32| {
        let mut buf = vec![0u8; 256];
        let rec = Record::Ack(devplane_wire::Ack {
            id: RequestId {
                vm: 3,
                hypervisor: 2,
                vcpu: 0,
                seq: u64::MAX,
            },
        });
        let n = devplane_wire::datagram::encode(
            &mut buf,
            Header::new(Kind::Ack, 42, 1, client),
            &[rec],
        )
        .unwrap();
        buf.truncate(n);
        buf
    };
    assert_eq!(d.handle(&mut ack(8)), Outcome::Foreign);
    assert_eq!(
        d.handle(&mut ack(7)),
        Outcome::Acked {
            model: 42,
            seq: u64::MAX,
            client: 7,
            // An ordinary acknowledgement says nothing of where the VM's
            // interrupts go.
            vm: None,
            irq_port: None,
        }
    );
    assert_eq!((d.stats().acks, d.stats().foreign_vm), (1, 1));
    // An announcement (a client's acknowledgement of nothing, naming its
    // interrupt port) says where VM 3's interrupts may go.
    let announce = |vm: u32| {
        let mut buf = vec![0u8; 256];
        let rec = Record::Ack(devplane_wire::Ack {
            id: RequestId {
                vm,
                hypervisor: 0,
                vcpu: 0,
                seq: 0,
            },
        });
        let n = devplane_wire::datagram::encode(
            &mut buf,
            Header::new(Kind::Ack, 42, 1, 7).with_irq_port(4242),
            &[rec],
        )
        .unwrap();
        buf.truncate(n);
        buf
    };
    assert_eq!(
        d.handle(&mut announce(3)),
        Outcome::Acked {
            model: 42,
            seq: 0,
            client: 7,
            vm: Some(3),
            irq_port: Some(4242),
        }
    );
    // One naming another VM than the model's is no announcement.
    assert!(matches!(
        d.handle(&mut announce(4)),
        Outcome::Acked { vm: None, .. }
    ));
}

/// Windows are bounded per worker too: however many registered VMs and
/// vCPUs send, no more than `MAX_WINDOWS` windows exist.
#[test]
fn windows_are_bounded_per_worker() {
    let mut d = dispatcher();
    let vms = (MAX_WINDOWS / MAX_VCPU_WINDOWS as usize) as u32 + 2;
    d.set_owners(Owners {
        by_vm: (1..=vms).map(|vm| (vm, 7)).collect(),
        check: true,
    });
    let mut refused = 0;
    for vm in 1..=vms {
        for vcpu in 0..MAX_VCPU_WINDOWS as u16 {
            let mut b = encode_from(7, 42, &[req_for(vm, vcpu, 1, READ)]);
            d.handle(&mut b);
            if statuses(&b)[0].0 == Status::Stale {
                refused += 1;
            }
        }
    }
    assert_eq!(d.window_count(), MAX_WINDOWS);
    assert_eq!(refused, 2 * MAX_VCPU_WINDOWS as u64);
    assert_eq!(d.stats().window_limit, refused);
}

fn sealed(model: u32, recs: &[Record], key: &tag::TagKey) -> Vec<u8> {
    let mut buf = encode(model, recs);
    let n = buf.len();
    buf.resize(n + devplane_wire::TAG_LEN, 0);
    tag::seal(&mut buf, n, key).unwrap();
    buf
}

fn key1() -> tag::TagKey {
    tag::TagKey::new(1, [0x5a; 16])
}
fn key2() -> tag::TagKey {
    tag::TagKey::new(2, [0xa5; 16])
}

fn write(seq: u64) -> Record {
    req(
        seq,
        Access::PioOut {
            port: 0x100,
            size: AccessSize::B1,
            data: 1,
        },
    )
}

fn count_of(d: &mut Dispatcher, key: &tag::TagKey, seq: u64) -> u64 {
    let read = req(
        seq,
        Access::PioIn {
            port: 0x100,
            size: AccessSize::B4,
        },
    );
    let mut b = sealed(42, &[read], key);
    assert!(matches!(d.handle(&mut b), Outcome::Respond { .. }));
    match Datagram::parse(&b).unwrap().records().next() {
        Some(Record::Response(r)) => r.data,
        other => panic!("{other:?}"),
    }
}

/// A client with a key: its tagged requests are applied and answered with
/// a tag under the same key; a wrong tag, a wrong key, an untagged
/// datagram and a truncated one are dropped and counted, nothing applied.
#[test]
fn tags_are_verified_before_anything_is_applied() {
    let mut d = dispatcher();
    d.set_keys(7, KeyRing::new(key1()));
    let mut ok = sealed(42, &[write(1)], &key1());
    assert!(matches!(d.handle(&mut ok), Outcome::Respond { .. }));
    assert_eq!(tag::verify(&ok, &KeyRing::new(key1())), Ok(()));
    assert_eq!(Datagram::parse(&ok).unwrap().kind(), Kind::Response);

    let mut flipped = sealed(42, &[write(2)], &key1());
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let mut other_key = sealed(42, &[write(3)], &key2());
    let mut wrong_bytes = sealed(42, &[write(4)], &tag::TagKey::new(1, [0; 16]));
    let mut untagged = encode(42, &[write(5)]);
    let mut truncated = sealed(42, &[write(6)], &key1());
    truncated.truncate(truncated.len() - 1);
    for b in [
        &mut flipped,
        &mut other_key,
        &mut wrong_bytes,
        &mut untagged,
    ] {
        assert_eq!(d.handle(b), Outcome::BadTag);
    }
    assert!(matches!(d.handle(&mut truncated), Outcome::Malformed(_)));
    assert_eq!(d.stats().bad_tag, 4);
    assert_eq!(
        count_of(&mut d, &key1(), 10),
        1,
        "only the first write applied"
    );
}

/// A client without a key sends untagged datagrams; a tagged one from it
/// names a key the server does not have.
#[test]
fn a_client_without_key_may_not_tag() {
    let mut d = dispatcher();
    let mut b = sealed(42, &[write(1)], &key1());
    assert_eq!(d.handle(&mut b), Outcome::BadTag);
    let mut plain = encode(42, &[write(2)]);
    assert!(matches!(d.handle(&mut plain), Outcome::Respond { .. }));
    assert_eq!(d.stats().bad_tag, 1);
}

/// During a rotation both keys are accepted (each answer sealed with its
/// request's key); after the grace period the old one is refused.
#[test]
fn rotation_accepts_both_keys_then_only_the_new() {
    let mut d = dispatcher();
    d.set_keys(7, KeyRing::new(key1()));
    let mut ring = KeyRing::new(key1());
    ring.rotate(key2());
    d.set_keys(7, ring.clone());
    let mut old = sealed(42, &[write(1)], &key1());
    let mut new = sealed(42, &[write(2)], &key2());
    assert!(matches!(d.handle(&mut old), Outcome::Respond { .. }));
    assert!(matches!(d.handle(&mut new), Outcome::Respond { .. }));
    assert_eq!(tag::verify(&old, &KeyRing::new(key1())), Ok(()));
    assert_eq!(tag::verify(&new, &KeyRing::new(key2())), Ok(()));
    ring.retire();
    d.set_keys(7, ring);
    let mut late = sealed(42, &[write(3)], &key1());
    assert_eq!(d.handle(&mut late), Outcome::BadTag);
    assert_eq!(count_of(&mut d, &key2(), 10), 2);
}

/// Interrupts are sealed with the key the client last sealed with while
/// the server still holds it (a client told of a rotation after its
/// server keeps sending with the old key meanwhile), else the current.
#[test]
fn interrupts_follow_the_key_the_client_uses() {
    let mut d = dispatcher();
    d.set_keys(7, KeyRing::new(key1()));
    assert_eq!(d.irq_key(7), Some(&key1()));
    let mut ring = KeyRing::new(key1());
    ring.rotate(key2());
    d.set_keys(7, ring.clone());
    assert_eq!(
        d.irq_key(7),
        Some(&key1()),
        "the client has not used key2() yet"
    );
    let mut new = sealed(42, &[write(1)], &key2());
    assert!(matches!(d.handle(&mut new), Outcome::Respond { .. }));
    assert_eq!(d.irq_key(7), Some(&key2()));
    // A forged datagram naming the old key does not move it back.
    let mut forged = sealed(42, &[write(2)], &tag::TagKey::new(1, [0; 16]));
    assert_eq!(d.handle(&mut forged), Outcome::BadTag);
    assert_eq!(d.irq_key(7), Some(&key2()));
    ring.retire();
    d.set_keys(7, ring);
    assert_eq!(d.irq_key(7), Some(&key2()));
    // Retired before the client used the new key: the current one.
    let mut d = dispatcher();
    d.set_keys(7, KeyRing::new(key1()));
    d.set_keys(7, KeyRing::new(key2()));
    assert_eq!(d.irq_key(7), Some(&key2()));
    // Keys removed: untagged again.
    d.clear_keys(7);
    assert_eq!(d.irq_key(7), None);
    let mut plain = encode(42, &[write(3)]);
    assert!(matches!(d.handle(&mut plain), Outcome::Respond { .. }));
}

#[test]
fn a_handover_through_its_wire_form_keeps_state_windows_and_interrupts() {
    let w = Access::PioOut {
        port: 0x100,
        size: AccessSize::B1,
        data: 5,
    };
    let r = Access::PioIn {
        port: 0x100,
        size: AccessSize::B4,
    };
    let mut a = dispatcher();
    a.handle(&mut encode(42, &[req(1, w), req(2, w)]));
    let irq = PendingIrq {
        model: 42,
        vm: 3,
        hypervisor: 2,
        event: IrqEvent {
            line: 5,
            action: devplane_wire::IrqAction::Edge,
        },
        seq: 9,
    };
    let h = a.lend(42, &[irq]).expect("owned");
    // Through JSON, as dpctl relays it between two servers.
    let text = serde_json::to_string(&h.to_wire(42)).unwrap();
    let wire = devplane_control::proto::ModelHandover::from_json(&text).unwrap();
    let back = Handover::from_wire(42, wire.clone()).unwrap();
    assert_eq!(back.kind, "counter");
    assert_eq!(back.irqs, vec![irq]);
    assert_eq!(back.irq_target, Some((3, 2)));
    let mut b = Dispatcher::new(1);
    b.adopt(42, back).unwrap();
    // Seq 2 again (its answer lost in the move) is not applied twice.
    let mut buf = encode(42, &[req(2, w), req(3, w), req(4, r)]);
    b.handle(&mut buf);
    assert_eq!(answers(&buf), vec![0, 0, 3]);
    assert_eq!(b.stats().duplicates, 1);
    // Bad bytes are refused with what was wrong.
    let mut bad = wire.clone();
    bad.kind = "fork-bomb".into();
    assert_eq!(
        Handover::from_wire(42, bad).err(),
        Some(HandoverError::Kind("fork-bomb".into()))
    );
    let mut bad = wire.clone();
    bad.windows[0].answers[0].1 = 200;
    assert_eq!(
        Handover::from_wire(42, bad).err(),
        Some(HandoverError::Status(200))
    );
    let mut bad = wire;
    bad.irqs[0].action = 0;
    assert_eq!(
        Handover::from_wire(42, bad).err(),
        Some(HandoverError::Action(0))
    );
    assert!(devplane_control::proto::ModelHandover::from_json("{\"kind\":").is_err());
}

/// A counter whose next `busy` reads wait on a backing store: they
/// answer [`DeviceError::Busy`] and change nothing.
struct Slow {
    busy: u32,
    inner: Counter,
}

impl devplane_devmodels::DeviceModel for Slow {
    fn kind(&self) -> &'static str {
        "slow"
    }
    fn read(
        &mut self,
        space: devplane_devmodels::Space,
        offset: u64,
        size: AccessSize,
    ) -> Result<u64, devplane_devmodels::DeviceError> {
        if self.busy > 0 {
            self.busy -= 1;
            return Err(devplane_devmodels::DeviceError::Busy { space, offset });
        }
        self.inner.read(space, offset, size)
    }
    fn write(
        &mut self,
        space: devplane_devmodels::Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), devplane_devmodels::DeviceError> {
        self.inner.write(space, offset, size, data)
    }
    fn snapshot(&self) -> devplane_devmodels::Snapshot {
        self.inner.snapshot()
    }
    fn restore(
        &mut self,
        snap: &devplane_devmodels::Snapshot,
    ) -> Result<(), devplane_devmodels::SnapshotError> {
        self.inner.restore(snap)
    }
}

/// A model waiting on its backing store answers `Busy`: the record is
/// neither applied nor remembered, and neither is any later record of its
/// datagram (the model sees one vCPU's accesses in order). Sent again,
/// each is applied once, in order, and the one applied before is answered
/// from the window.
#[test]
fn a_busy_record_and_those_after_it_are_neither_applied_nor_remembered() {
    let mut d = Dispatcher::new(1);
    let slow = Slow {
        busy: 1,
        inner: Counter::new(5),
    };
    d.insert(42, ModelSlot::new(Box::new(slow), 0x100, 0xd000_0000));
    let read = Access::PioIn {
        port: 0x100,
        size: AccessSize::B4,
    };
    let recs = [req(1, WRITE), req(2, read), req(3, WRITE), req(4, read)];
    let mut first = encode(42, &recs);
    d.handle(&mut first);
    assert_eq!(
        statuses(&first),
        vec![
            (Status::Ok, 0),
            (Status::Busy, 0),
            (Status::Busy, 0),
            (Status::Busy, 0)
        ]
    );
    assert_eq!(
        d.stats().writes,
        1,
        "the write after the busy read was applied"
    );
    assert_eq!(d.stats().busy, 3);
    assert_eq!(d.stats().model_errors, 0, "busy is not a refusal");
    let mut again = encode(42, &recs);
    d.handle(&mut again);
    assert_eq!(
        statuses(&again),
        vec![
            (Status::Ok, 0),
            (Status::Ok, 1),
            (Status::Ok, 0),
            (Status::Ok, 2)
        ],
        "each applied once, in order"
    );
    assert_eq!(d.stats().duplicates, 1);
    assert_eq!(d.stats().writes, 2);
}
