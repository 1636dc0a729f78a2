// Depthwise convolution over NHWC f32 activations with TensorFlow "same" padding, bias and optional ReLU6:
// one thread per output element. Compiled at run time with NVRTC (see depthwise_cuda.rs), so it uses plain
// C types only and includes no CUDA header.
extern "C" __global__ void depthwise_nhwc_f32(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ y, int n, int h, int wd, int c, int ho, int wo, int k, int s,
    int top, int left, int relu6)
{
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n * ho * wo * c;
    if (i >= total) return;
    int ch = (int)(i % c);
    long long r = i / c;
    int ox = (int)(r % wo);
    r /= wo;
    int oy = (int)(r % ho);
    long long img = r / ho;
    const float* image = x + img * h * wd * c;
    const float* taps = w + (long long)ch * k * k;
    float acc = b[ch];
    for (int ky = 0; ky < k; ++ky) {
        int iy = oy * s + ky - top;
        if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < k; ++kx) {
            int ix = ox * s + kx - left;
            if (ix < 0 || ix >= wd) continue;
            acc += image[((long long)iy * wd + ix) * c + ch] * taps[ky * k + kx];
        }
    }
    if (relu6) acc = fminf(fmaxf(acc, 0.0f), 6.0f);
    y[i] = acc;
}
