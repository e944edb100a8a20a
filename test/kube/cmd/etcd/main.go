// Command etcd is etcd's own server (go.etcd.io/etcd/server/v3/etcdmain) built at the version
// pinned in this module's go.mod, so the test control plane needs no downloaded binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
