// fake-device-plugin advertises fake nvidia.com/gpu devices to a kubelet through the real
// device-plugin gRPC API (v1beta1), for tests on a node without GPUs. Like NVIDIA's plugin it
// sets NVIDIA_VISIBLE_DEVICES in each container to the UUIDs of the devices allocated to it.
// The device count is read from a file, re-read while running: when it changes, ListAndWatch
// sends the new list, as a real plugin does when a GPU appears or fails.
package main

import (
	"context"
	"crypto/sha1"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// sourceHash is set at build time (install-node.sh caches the binary by it).
var sourceHash = "unknown"

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	seed string

	mu      sync.Mutex
	count   int
	changed chan struct{} // closed and replaced on every count change
}

// deviceUUID is stable for a seed and an index, shaped like NVIDIA's GPU-xxxxxxxx-... UUIDs.
func deviceUUID(seed string, index int) string {
	sum := sha1.Sum([]byte(fmt.Sprintf("%s/%d", seed, index)))
	return fmt.Sprintf("GPU-%x-%x-%x-%x-%x", sum[0:4], sum[4:6], sum[6:8], sum[8:10], sum[10:16])
}

func (p *plugin) devices() ([]*pluginapi.Device, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	devices := make([]*pluginapi.Device, p.count)
	for i := range devices {
		devices[i] = &pluginapi.Device{ID: deviceUUID(p.seed, i), Health: pluginapi.Healthy}
	}
	return devices, p.changed
}

func (p *plugin) setCount(count int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if count == p.count {
		return
	}
	log.Printf("device count %d -> %d", p.count, count)
	p.count = count
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	for {
		devices, changed := p.devices()
		if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: devices}); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

func (p *plugin) Allocate(_ context.Context, request *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	response := &pluginapi.AllocateResponse{}
	for _, container := range request.ContainerRequests {
		ids := strings.Join(container.DevicesIds, ",")
		log.Printf("allocate %s", ids)
		response.ContainerResponses = append(response.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": ids},
		})
	}
	return response, nil
}

func readCount(path string) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	count, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || count < 0 {
		return 0, fmt.Errorf("%s: not a device count: %q", path, data)
	}
	return count, nil
}

// watchCount polls the count file: it is small, and polling also sees a file replaced by rename.
func (p *plugin) watchCount(path string) {
	for range time.Tick(200 * time.Millisecond) {
		count, err := readCount(path)
		if err != nil {
			log.Printf("keeping %d devices: %v", p.count, err)
			continue
		}
		p.setCount(count)
	}
}

func register(directory, endpoint, resource string) error {
	kubelet := "unix://" + filepath.Join(directory, filepath.Base(pluginapi.KubeletSocket))
	connection, err := grpc.NewClient(kubelet, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer connection.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(connection).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     endpoint,
		ResourceName: resource,
	})
	return err
}

func main() {
	directory := flag.String("directory", pluginapi.DevicePluginPath, "the kubelet's device-plugin directory")
	resource := flag.String("resource", "nvidia.com/gpu", "the extended resource advertised")
	countFile := flag.String("count-file", "", "a file holding the number of devices (re-read while running)")
	seed := flag.String("seed", "fake-gpu", "what the device UUIDs derive from (e.g. the node's name)")
	version := flag.Bool("version", false, "print the hash of the sources it was built from")
	flag.Parse()
	if *version {
		fmt.Println(sourceHash)
		return
	}
	if *countFile == "" {
		log.Fatal("-count-file is required")
	}
	count, err := readCount(*countFile)
	if err != nil {
		log.Fatal(err)
	}
	p := &plugin{seed: *seed, count: count, changed: make(chan struct{})}

	endpoint := "fake-gpu.sock"
	socket := filepath.Join(*directory, endpoint)
	_ = os.Remove(socket)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatal(err)
	}
	server := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(server, p)
	go func() {
		if err := server.Serve(listener); err != nil {
			log.Fatal(err)
		}
	}()
	if err := register(*directory, endpoint, *resource); err != nil {
		log.Fatalf("registering with the kubelet: %v", err)
	}
	log.Printf("registered %s with %d devices (source %s)", *resource, count, sourceHash)
	go p.watchCount(*countFile)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	server.Stop()
	_ = os.Remove(socket)
}
