package main

// The control plane's certificates and keys, generated fresh for every `up`: a CA, the API
// server's serving certificate, an admin client certificate and the service-account key pair.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pkiFiles names the files `up` writes under DIR/pki.
type pkiFiles struct {
	CACert, CAKey                        string
	ServingCert, ServingKey              string
	AdminCert, AdminKey                  string
	ServiceAccountKey, ServiceAccountPub string
}

func pkiPaths(dir string) pkiFiles {
	p := func(name string) string { return filepath.Join(dir, "pki", name) }
	return pkiFiles{
		CACert: p("ca.crt"), CAKey: p("ca.key"),
		ServingCert: p("apiserver.crt"), ServingKey: p("apiserver.key"),
		AdminCert: p("admin.crt"), AdminKey: p("admin.key"),
		ServiceAccountKey: p("sa.key"), ServiceAccountPub: p("sa.pub"),
	}
}

// validity of every certificate: a control plane lives for one test run or one demo.
const validity = 30 * 24 * time.Hour

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func writePEM(path, kind string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), mode)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

// generatePKI writes every file of pkiPaths(dir).
func generatePKI(dir string) (pkiFiles, error) {
	files := pkiPaths(dir)
	if err := os.MkdirAll(filepath.Dir(files.CACert), 0o700); err != nil {
		return files, err
	}
	now := time.Now().Add(-time.Hour) // tolerate a little clock skew
	caKey, err := newKey()
	if err != nil {
		return files, err
	}
	caSerial, err := serial()
	if err != nil {
		return files, err
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          caSerial,
		Subject:               pkix.Name{CommonName: "kubecp test CA"},
		NotBefore:             now,
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return files, fmt.Errorf("CA: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return files, err
	}
	if err := writePEM(files.CACert, "CERTIFICATE", caDER, 0o644); err != nil {
		return files, err
	}
	if err := writeKey(files.CAKey, caKey); err != nil {
		return files, err
	}

	leaf := func(certPath, keyPath string, template *x509.Certificate) error {
		key, err := newKey()
		if err != nil {
			return err
		}
		if template.SerialNumber, err = serial(); err != nil {
			return err
		}
		template.NotBefore, template.NotAfter = now, now.Add(validity)
		template.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("%s: %w", template.Subject.CommonName, err)
		}
		if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
		return writeKey(keyPath, key)
	}
	if err := leaf(files.ServingCert, files.ServingKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1"), net.ParseIP(serviceIP)},
	}); err != nil {
		return files, err
	}
	if err := leaf(files.AdminCert, files.AdminKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return files, err
	}

	saKey, err := newKey()
	if err != nil {
		return files, err
	}
	if err := writeKey(files.ServiceAccountKey, saKey); err != nil {
		return files, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return files, err
	}
	return files, writePEM(files.ServiceAccountPub, "PUBLIC KEY", saPub, 0o644)
}
