// The host memory behind a memslot, as the VMM allocates it. The binding
// allocates it (kvm/memslot.ts) and the model VM's table of backings says
// which kind each declared backing is (model/vm.ts BACKINGS); the model's page
// backing (model/memslots.ts Backing) is another thing.

export type HostBacking =
  | { kind: 'anon'; thp?: boolean }
  | { kind: 'shared' }
  | { kind: 'memfd'; hugetlb?: boolean }
  | { kind: 'hugetlb'; pageSize: '2M' | '1G' }
  /** An mmap-able, initially shared guest_memfd of the VM (Vm.addMemslot creates it: it needs the VM). */
  | { kind: 'guest_memfd' };
