//! An in-memory stand-in for one node's VXLAN devices in unit tests: it keeps the
//! devices that are up, refuses a VNI one of them has (as the kernel does on one
//! port in one namespace) and can refuse the next few creations with a clash.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use nsm_sdk::async_trait;
use nsm_sdk_kernel::{NetNs, Plan};

use super::tunnel::{Device, Devices};
use crate::error::{Error, Result};
use crate::link::VxlanSpec;

#[derive(Debug, Default)]
pub(crate) struct State {
    /// VNI → (spec, plan) of the devices that are up.
    pub(crate) live: BTreeMap<u32, (VxlanSpec, Plan)>,
    /// Creations refused with a clash before the next one succeeds.
    pub(crate) clash_next: usize,
    pub(crate) ups: usize,
    pub(crate) refreshes: usize,
    pub(crate) downs: usize,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct FakeDevices(pub(crate) Arc<Mutex<State>>);

impl FakeDevices {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
    pub(crate) fn clash_next(&self, n: usize) {
        self.state().clash_next = n;
    }
    /// The one device that is up.
    pub(crate) fn only(&self) -> (VxlanSpec, Plan) {
        let s = self.state();
        assert_eq!(s.live.len(), 1, "{:?}", s.live);
        s.live.values().next().cloned().unwrap()
    }
}

#[async_trait]
impl Devices for FakeDevices {
    async fn up(&self, _pod: &NetNs, spec: &VxlanSpec, plan: Plan) -> Result<Box<dyn Device>> {
        let mut s = self.state();
        let clash = || Error::VniClash {
            vni: spec.vni.get(),
            port: spec.port,
            netns: "fake".into(),
        };
        if s.clash_next > 0 {
            s.clash_next -= 1;
            return Err(clash());
        }
        if s.live.contains_key(&spec.vni.get()) {
            return Err(clash());
        }
        s.ups += 1;
        let mac = plan.mac();
        s.live.insert(spec.vni.get(), (spec.clone(), plan));
        Ok(Box::new(FakeDevice {
            spec: spec.clone(),
            mac,
            devices: self.clone(),
        }))
    }
}

#[derive(Debug)]
struct FakeDevice {
    spec: VxlanSpec,
    mac: Option<[u8; 6]>,
    devices: FakeDevices,
}

#[async_trait]
impl Device for FakeDevice {
    fn spec(&self) -> &VxlanSpec {
        &self.spec
    }
    fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }
    async fn refresh(&mut self, plan: Plan) -> Result<()> {
        let mut s = self.devices.state();
        s.refreshes += 1;
        match s.live.get_mut(&self.spec.vni.get()) {
            Some(entry) => {
                entry.1 = plan;
                Ok(())
            }
            None => Err(nsm_sdk_kernel::Error::LinkNotFound {
                name: plan.ifname().to_string(),
                netns: "fake".into(),
            }
            .into()),
        }
    }
    async fn down(self: Box<Self>) -> Result<()> {
        let mut s = self.devices.state();
        s.downs += 1;
        s.live.remove(&self.spec.vni.get());
        Ok(())
    }
}
