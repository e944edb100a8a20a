// Command anp-client plays kube-apiserver's egress dialer against a konnectivity server, using the
// konnectivity-client module at the version pinned in this module's go.mod. It opens tunnels to
// -address (an echo server), writes -bytes pseudo-random bytes through each, reads them back,
// compares, and closes. On success it prints one line of JSON:
//
//	{"ok":true,"mode":"grpc","tunnels":4,"bytes":4194304,"close_raced":0,"ms":123}
//
// On failure it prints {"ok":false,"error":"..."} on stdout, the message on stderr, and exits 1.
// With -expect-fail the tunnel must fail; then it prints {"ok":true,"failed":true,"stage":...}.
// With -echo-listen ADDR it is instead a TCP echo server; it prints {"listen":"host:port"} and
// serves until killed.
//
// The same source is built by test/anp/current and test/anp/v2022.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	konnectivity "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
	proto "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client"
)

var (
	mode       = flag.String("mode", "grpc", "frontend protocol: grpc or http-connect")
	udsPath    = flag.String("uds", "", "the server's frontend unix socket (grpc, or http-connect in plaintext)")
	tcpAddr    = flag.String("tcp", "", "the server's frontend host:port (http-connect over TLS with a client certificate)")
	caFile     = flag.String("ca", "", "with -tcp: CA bundle that verifies the server")
	certFile   = flag.String("cert", "", "with -tcp: client certificate")
	keyFile    = flag.String("key", "", "with -tcp: client key")
	serverName = flag.String("server-name", "", "with -tcp: TLS server name (default: the host of -tcp)")
	address    = flag.String("address", "", "destination host:port to dial through the tunnel")
	nbytes     = flag.Int("bytes", 1<<20, "bytes to write and read back through each tunnel (0: open and close only)")
	count      = flag.Int("count", 1, "sequential tunnels per worker")
	parallel   = flag.Int("parallel", 1, "workers running at once (tunnels in all: count*parallel)")
	expectFail = flag.Bool("expect-fail", false, "the tunnel must fail (dial or echo); print the error and exit 0")
	reusable   = flag.Bool("reusable", false, "grpc: one gRPC connection, one Proxy stream per tunnel (raw packets, not konnectivity-client)")
	timeout    = flag.Duration("timeout", 30*time.Second, "bound on the whole run")
	echoListen = flag.String("echo-listen", "", "run a TCP echo server on this address instead (e.g. 127.0.0.1:0)")
)

func main() {
	flag.Parse()
	if *echoListen != "" {
		echo(*echoListen)
		return
	}
	if err := validate(); err != nil {
		fmt.Fprintf(os.Stderr, "anp-client: %v\n", err)
		os.Exit(2)
	}
	// The hard bound: whatever hangs (konnectivity-client conns have no deadlines), the run ends.
	time.AfterFunc(*timeout+2*time.Second, func() { fail(fmt.Errorf("timed out after %v", *timeout)) })
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	start := time.Now()
	var d dialer
	switch {
	case *mode == "grpc" && *reusable:
		r, err := newReusable(ctx)
		if err != nil {
			finish(start, "connect", err)
		}
		defer r.cc.Close()
		d = r
	case *mode == "grpc":
		d = singleUse{}
	default:
		d = httpConnect{}
	}

	var (
		wg       sync.WaitGroup
		total    atomic.Int64
		tunnels  atomic.Int64
		errOnce  sync.Once
		firstErr error
		stage    string
	)
	for w := 0; w < *parallel; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < *count; i++ {
				st, err := oneTunnel(ctx, d, int64(w)<<32|int64(i))
				if err != nil {
					errOnce.Do(func() { firstErr, stage = err, st })
					cancel()
					return
				}
				tunnels.Add(1)
				total.Add(int64(*nbytes))
			}
		}(w)
	}
	wg.Wait()
	if firstErr != nil {
		finish(start, stage, firstErr)
	}
	if *expectFail {
		fail(fmt.Errorf("expected the tunnel to fail, but %d tunnel(s) succeeded", tunnels.Load()))
	}
	out(map[string]any{"ok": true, "mode": *mode, "reusable": *reusable, "tunnels": tunnels.Load(),
		"bytes": total.Load(), "close_raced": closeRaced.Load(), "ms": time.Since(start).Milliseconds()})
}

func validate() error {
	if *address == "" {
		return errors.New("-address is required")
	}
	if *count < 1 || *parallel < 1 || *nbytes < 0 {
		return errors.New("-count and -parallel must be >= 1, -bytes >= 0")
	}
	switch *mode {
	case "grpc":
		if *udsPath == "" {
			return errors.New("-mode grpc needs -uds (kube-apiserver speaks gRPC only over UDS)")
		}
	case "http-connect":
		if (*udsPath == "") == (*tcpAddr == "") {
			return errors.New("-mode http-connect needs exactly one of -uds and -tcp")
		}
		if *tcpAddr != "" && (*caFile == "" || *certFile == "" || *keyFile == "") {
			return errors.New("-tcp needs -ca, -cert and -key")
		}
		if *reusable {
			return errors.New("-reusable is for -mode grpc")
		}
	default:
		return fmt.Errorf("-mode %q: want grpc or http-connect", *mode)
	}
	return nil
}

// finish ends the run after a tunnel failed: success with -expect-fail, failure otherwise.
func finish(start time.Time, stage string, err error) {
	if !*expectFail {
		fail(fmt.Errorf("%s: %w", stage, err))
	}
	fmt.Fprintf(os.Stderr, "anp-client: failed as expected at %s: %v\n", stage, err)
	out(map[string]any{"ok": true, "failed": true, "stage": stage, "error": err.Error(),
		"ms": time.Since(start).Milliseconds()})
	os.Exit(0)
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "anp-client: %v\n", err)
	out(map[string]any{"ok": false, "error": err.Error()})
	os.Exit(1)
}

var outMu sync.Mutex

func out(v map[string]any) {
	outMu.Lock()
	defer outMu.Unlock()
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

type dialer interface {
	dial(ctx context.Context, address string) (net.Conn, error)
}

// oneTunnel dials, echoes -bytes through, and closes. It returns the stage that failed.
func oneTunnel(ctx context.Context, d dialer, seed int64) (string, error) {
	conn, err := d.dial(ctx, *address)
	if err != nil {
		return "dial", err
	}
	// konnectivity-client conns ignore deadlines: closing on cancel is what unblocks them.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := echoThrough(conn, seed); err != nil {
		conn.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", err, ctx.Err())
		}
		return "echo", err
	}
	if err := conn.Close(); err != nil {
		if err.Error() != "tunnel closed" {
			return "close", err
		}
		// konnectivity-client's Close waits for the CLOSE_RSP and for the tunnel's end in one
		// select; a single-use tunnel ends right after it queues the CLOSE_RSP, so when Close
		// gets there late both are ready and Go picks one at random (pkg/client/conn.go). The
		// echo went through; the tests check that the agent's side of the tunnel closed.
		closeRaced.Add(1)
	}
	return "", nil
}

// closeRaced counts Close calls that lost konnectivity-client's select to the tunnel's end.
var closeRaced atomic.Int64

func echoThrough(conn net.Conn, seed int64) error {
	if *nbytes == 0 {
		return nil
	}
	want := make([]byte, *nbytes)
	rand.New(rand.NewSource(seed)).Read(want)
	werr := make(chan error, 1)
	go func() {
		var err error
		for off := 0; off < len(want) && err == nil; off += 32 << 10 {
			_, err = conn.Write(want[off:min(off+32<<10, len(want))])
		}
		werr <- err
	}()
	got := make([]byte, len(want))
	if n, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("read %d of %d bytes back: %w", n, len(want), err)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		return fmt.Errorf("echoed bytes differ from byte %d on", i)
	}
	return nil
}

// singleUse is what kube-apiserver does for proxyProtocol GRPC over UDS: one gRPC connection and
// one Proxy stream per dial, through konnectivity-client's CreateSingleUseGrpcTunnel.
type singleUse struct{}

func (singleUse) dial(ctx context.Context, address string) (net.Conn, error) {
	path := *udsPath
	tunnel, err := konnectivity.CreateSingleUseGrpcTunnel(ctx, path,
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}),
		grpc.WithBlock(),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("create tunnel: %w", err)
	}
	conn, err := tunnel.DialContext(ctx, "tcp", address)
	if err != nil {
		return nil, err
	}
	return conn, nil
}

// httpConnect is kube-apiserver's proxyProtocol HTTPConnect: a fresh UDS or TLS connection per
// dial, exactly this CONNECT request, any status but 200 is a failure, and so are bytes after the
// response headers.
type httpConnect struct{}

func (httpConnect) dial(ctx context.Context, address string) (net.Conn, error) {
	var (
		conn net.Conn
		err  error
	)
	if *udsPath != "" {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", *udsPath)
	} else {
		var cfg *tls.Config
		if cfg, err = tlsConfig(); err != nil {
			return nil, err
		}
		d := tls.Dialer{Config: cfg}
		conn, err = d.DialContext(ctx, "tcp", *tcpAddr)
	}
	if err != nil {
		return nil, err
	}
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	if _, err := fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", address, "127.0.0.1"); err != nil {
		conn.Close()
		return nil, fmt.Errorf("write CONNECT: %w", err)
	}
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading proxy response: %w", err)
	}
	if res.StatusCode != 200 {
		body, _ := io.ReadAll(io.LimitReader(res.Body, 512))
		conn.Close()
		return nil, fmt.Errorf("proxy answered %q: %s", res.Status, strings.TrimSpace(string(body)))
	}
	if br.Buffered() > 0 {
		peek, _ := br.Peek(min(br.Buffered(), 200))
		conn.Close()
		return nil, fmt.Errorf("unexpected %d bytes of buffered data after 200: %q", br.Buffered(), peek)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

func tlsConfig() (*tls.Config, error) {
	pem, err := os.ReadFile(*caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no certificates", *caFile)
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		return nil, err
	}
	name := *serverName
	if name == "" {
		if name, _, err = net.SplitHostPort(*tcpAddr); err != nil {
			return nil, err
		}
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: name}, nil
}

// reusableDialer holds one gRPC connection and opens one Proxy stream per tunnel, speaking the packets
// itself (konnectivity-client's own reusable tunnel, CreateGRPCTunnel, is newer than the pinned tag).
type reusableDialer struct{ cc *grpc.ClientConn }

func newReusable(ctx context.Context) (*reusableDialer, error) {
	path := *udsPath
	cc, err := grpc.DialContext(ctx, path,
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}),
		grpc.WithBlock(),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	return &reusableDialer{cc: cc}, nil
}

func (r *reusableDialer) dial(ctx context.Context, address string) (net.Conn, error) {
	sctx, cancel := context.WithCancel(ctx)
	stream, err := proto.NewProxyServiceClient(r.cc).Proxy(sctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("open Proxy stream: %w", err)
	}
	random := rand.Int63()
	err = stream.Send(&proto.Packet{Type: proto.PacketType_DIAL_REQ, Payload: &proto.Packet_DialRequest{
		DialRequest: &proto.DialRequest{Protocol: "tcp", Address: address, Random: random}}})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("send DIAL_REQ: %w", err)
	}
	pkt, err := stream.Recv()
	if err != nil {
		cancel()
		return nil, fmt.Errorf("waiting for DIAL_RSP: %w", err)
	}
	rsp := pkt.GetDialResponse()
	switch {
	case pkt.Type != proto.PacketType_DIAL_RSP || rsp == nil:
		cancel()
		return nil, fmt.Errorf("got %v, want DIAL_RSP", pkt.Type)
	case rsp.Random != random:
		cancel()
		return nil, fmt.Errorf("DIAL_RSP for random %d, want %d", rsp.Random, random)
	case rsp.Error != "":
		cancel()
		return nil, fmt.Errorf("dial failed: %s", rsp.Error)
	}
	c := &rawConn{stream: stream, cancel: cancel, id: rsp.ConnectID, data: make(chan []byte, 16)}
	go c.recv()
	return c, nil
}

// rawConn is one tunnel on one Proxy stream.
type rawConn struct {
	stream  proto.ProxyService_ProxyClient
	cancel  context.CancelFunc
	id      int64
	data    chan []byte // closed when the stream or the tunnel ends
	sendMu  sync.Mutex  // a gRPC stream allows one sender at a time
	err     error       // why data was closed, read after it is
	pending []byte
	once    sync.Once
}

func (c *rawConn) recv() {
	defer close(c.data)
	for {
		pkt, err := c.stream.Recv()
		if err != nil {
			c.err = err
			return
		}
		switch pkt.Type {
		case proto.PacketType_DATA:
			c.data <- pkt.GetData().Data // Read or Close drains it
		case proto.PacketType_CLOSE_RSP:
			c.err = io.EOF
			if e := pkt.GetCloseResponse().Error; e != "" {
				c.err = fmt.Errorf("CLOSE_RSP: %s", e)
			}
			return
		default:
			c.err = fmt.Errorf("unexpected %v packet", pkt.Type)
			return
		}
	}
}

func (c *rawConn) Read(b []byte) (int, error) {
	for len(c.pending) == 0 {
		d, ok := <-c.data
		if !ok {
			if c.err == nil || errors.Is(c.err, io.EOF) {
				return 0, io.EOF
			}
			return 0, c.err
		}
		c.pending = d
	}
	n := copy(b, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

func (c *rawConn) send(pkt *proto.Packet) error {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	return c.stream.Send(pkt)
}

func (c *rawConn) Write(b []byte) (int, error) {
	err := c.send(&proto.Packet{Type: proto.PacketType_DATA, Payload: &proto.Packet_Data{
		Data: &proto.Data{ConnectID: c.id, Data: b}}})
	if err != nil {
		return 0, err
	}
	return len(b), nil
}

// Close sends CLOSE_REQ and waits (10 s, like konnectivity-client) for the CLOSE_RSP.
func (c *rawConn) Close() error {
	var err error
	c.once.Do(func() {
		defer c.cancel()
		err = c.send(&proto.Packet{Type: proto.PacketType_CLOSE_REQ, Payload: &proto.Packet_CloseRequest{
			CloseRequest: &proto.CloseRequest{ConnectID: c.id}}})
		if err != nil {
			return
		}
		t := time.NewTimer(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case _, ok := <-c.data:
				if !ok {
					return
				}
			case <-t.C:
				err = errors.New("no CLOSE_RSP within 10 s")
				return
			}
		}
	})
	return err
}

func (c *rawConn) LocalAddr() net.Addr              { return nil }
func (c *rawConn) RemoteAddr() net.Addr             { return nil }
func (c *rawConn) SetDeadline(time.Time) error      { return nil }
func (c *rawConn) SetReadDeadline(time.Time) error  { return nil }
func (c *rawConn) SetWriteDeadline(time.Time) error { return nil }

func echo(addr string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "anp-client: %v\n", err)
		os.Exit(1)
	}
	out(map[string]any{"listen": l.Addr().String()})
	for {
		c, err := l.Accept()
		if err != nil {
			fmt.Fprintf(os.Stderr, "anp-client: accept: %v\n", err)
			os.Exit(1)
		}
		go func() {
			defer c.Close()
			io.Copy(c, c)
		}()
	}
}
