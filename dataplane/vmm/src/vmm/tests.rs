//! Unit tests of the builder.
use super::*;

fn vm_spec(id: u32, devices: Vec<DeviceSpec>) -> VmSpec {
    VmSpec {
        id,
        hypervisor: 1,
        mem_bytes: 0x2_0000,
        images: Vec::new(),
        vcpus: Vec::new(),
        devices,
    }
}

fn client(vms: Vec<VmSpec>) -> ClientSpec {
    ClientSpec {
        client: 1,
        bind: None,
        servers: Vec::new(),
        vms,
        engine: EngineConfig::default(),
        engine_core: None,
        vcpu_spin: 0,
        samples: 0,
        direct: false,
    }
}

fn boot(vm: u32) -> LinuxVm {
    LinuxVm {
        vm,
        boot: LinuxBoot {
            kernel: "vmlinux".into(),
            initrd: None,
            cmdline: String::new(),
            console: Console::new(),
        },
    }
}

fn why(e: ClientError) -> (u32, String) {
    match e {
        ClientError::Config { vm, why } => (vm, why),
        other => panic!("not a configuration error: {other}"),
    }
}

#[test]
fn a_linux_boot_names_one_vm_of_the_client_once() {
    let spec = client(vec![vm_spec(1, Vec::new()), vm_spec(2, Vec::new())]);
    let boots = linux_boots(&spec, vec![boot(2)]).unwrap();
    assert_eq!(boots.keys().collect::<Vec<_>>(), [&2]);
    let e = linux_boots(&spec, vec![boot(3)]).unwrap_err();
    assert_eq!(
        why(e),
        (3, "boots Linux but is not in the client's VMs".into())
    );
    let e = linux_boots(&spec, vec![boot(1), boot(1)]).unwrap_err();
    assert_eq!(why(e), (1, "has two Linux boots".into()));
}

#[test]
fn only_a_remote_com1_is_tapped() {
    let com1 = |place| DeviceSpec {
        space: Space::Pio,
        base: u64::from(UART_PORT),
        len: 8,
        model: 7,
        posted: false,
        place,
    };
    let console = Console::new();
    let remote = vm_spec(1, vec![com1(Place::Remote { server: 0 })]);
    assert!(uart_tap(&remote, &console).is_some());
    let local = vm_spec(
        1,
        vec![com1(Place::Local {
            kind: "uart".into(),
        })],
    );
    assert!(uart_tap(&local, &console).is_none());
    let elsewhere = vm_spec(
        1,
        vec![DeviceSpec {
            base: 0x2f8,
            ..com1(Place::Remote { server: 0 })
        }],
    );
    assert!(uart_tap(&elsewhere, &console).is_none());
}
